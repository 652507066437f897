"""`cellmtl export`: hand a trained model to other tools.

ONNX: input `image` float32 `[N, C, H, W]`, already normalised as the checkpoint's `normalizer` says
(per-channel percentiles; a pretrained backbone's ImageNet mean/std are applied inside the graph); outputs
`prob_infected` `[N]` and `time_hours` `[N]` (hours since onset for infected, since experiment start for
uninfected). The normalisation and channel list are written into the model's metadata (`cellmtl.*` keys) so a
consumer can reproduce the preprocessing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cellmtl.checkpoints import load_checkpoint, model_from_checkpoint
from cellmtl.errors import BadInputError
from cellmtl.models import MultiTaskNet

OPSET = 18


class ExportWrapper(nn.Module):
    """Plain tensors out (no dict): probability and hours, the quantities users read."""

    def __init__(self, model: MultiTaskNet) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(image)
        n = image.shape[0]
        prob = torch.sigmoid(out["infected"]) if "infected" in out else image.new_full((n,), float("nan"))
        hours = self.model.time_hours(out["time"]) if "time" in out else image.new_full((n,), float("nan"))
        return prob, hours


def onnx_graph(wrapper: nn.Module, in_chans: int, size: int, path: Path, outputs: list[str]) -> Path:
    """`wrapper` as ONNX with input `image` `[N, C, size, size]` and a dynamic batch axis (the torch.export
    based exporter; TorchScript export is deprecated). Shared by the ONNX and bioimage.io exports."""
    torch.onnx.export(
        wrapper.eval(),
        (torch.zeros(2, in_chans, size, size),),
        str(path),
        input_names=["image"],
        output_names=outputs,
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    return path


def export_onnx(checkpoint: str | Path, out: str | Path) -> Path:
    """Write an ONNX model with a dynamic batch axis; returns its path."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_graph(ExportWrapper(model), model.spec.in_chans, int(ckpt["image_size"]), out, ["prob_infected", "time_hours"])
    add_metadata(out, ckpt)
    return out


def add_metadata(path: Path, ckpt: dict) -> None:
    import onnx

    proto = onnx.load(str(path))
    meta = {
        "cellmtl.normalizer": json.dumps(ckpt["normalizer"]),
        "cellmtl.channels": json.dumps(ckpt["channels"]),
        "cellmtl.channel_names": json.dumps(ckpt.get("channel_names")),  # null: channels were not named
        "cellmtl.image_size": str(ckpt["image_size"]),
        "cellmtl.task_mode": ckpt["model_spec"]["mode"],
        "cellmtl.time_head": ckpt["model_spec"].get("time_head", "shared"),
        # input channels = these frames (hour offsets, oldest first) x the channels above; null = one frame
        "cellmtl.temporal_context_hours": json.dumps(ckpt.get("temporal_context_hours")),
        # already inside the graph (a pretrained stem's statistics after the normaliser); for the record only
        "cellmtl.backbone": ckpt["model_spec"]["name"],
        "cellmtl.input_mean": json.dumps(ckpt["model_spec"].get("input_mean")),
        "cellmtl.input_std": json.dumps(ckpt["model_spec"].get("input_std")),
    }
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))


def export(checkpoint: str | Path, fmt: str, out: str | Path) -> Path:
    if fmt not in ("onnx", "bioimageio"):
        raise BadInputError(f"export format {fmt!r} is not supported (supported: onnx, bioimageio)")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise BadInputError("export --format onnx needs the 'export' extra: pip install 'cellmtl[export]'") from None
    if fmt == "bioimageio":
        from cellmtl.bioimage_package import export_bioimageio

        return export_bioimageio(checkpoint, out)
    return export_onnx(checkpoint, out)
