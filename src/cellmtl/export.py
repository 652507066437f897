"""`cellmtl export`: hand a trained model to other tools.

ONNX: input `image` float32 `[N, C, H, W]`, already normalised as the checkpoint's `normalizer` says
(per-channel percentiles); outputs `prob_infected` `[N]` and `time_hours` `[N]` (hours since onset for
infected, since experiment start for uninfected). The normalisation and channel list are written into
the model's metadata (`cellmtl.*` keys) so a consumer can reproduce the preprocessing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cellmtl.checkpoints import load_checkpoint, model_from_checkpoint
from cellmtl.errors import BadInputError
from cellmtl.models import MultiTaskResNet


class ExportWrapper(nn.Module):
    """Plain tensors out (no dict): probability and hours, the quantities users read."""

    def __init__(self, model: MultiTaskResNet) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(image)
        n = image.shape[0]
        prob = torch.sigmoid(out["infected"]) if "infected" in out else image.new_full((n,), float("nan"))
        hours = self.model.time_hours(out["time"]) if "time" in out else image.new_full((n,), float("nan"))
        return prob, hours


def export_onnx(checkpoint: str | Path, out: str | Path) -> Path:
    """Write an ONNX model with a dynamic batch axis; returns its path."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    wrapper = ExportWrapper(model).eval()
    size = int(ckpt["image_size"])
    example = torch.zeros(2, model.spec.in_chans, size, size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # torch.export-based exporter (TorchScript export is deprecated); the batch axis stays dynamic.
    torch.onnx.export(
        wrapper,
        (example,),
        str(out),
        input_names=["image"],
        output_names=["prob_infected", "time_hours"],
        dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1)}},
        opset_version=18,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    add_metadata(out, ckpt)
    return out


def add_metadata(path: Path, ckpt: dict) -> None:
    import onnx

    proto = onnx.load(str(path))
    meta = {
        "cellmtl.normalizer": json.dumps(ckpt["normalizer"]),
        "cellmtl.channels": json.dumps(ckpt["channels"]),
        "cellmtl.image_size": str(ckpt["image_size"]),
        "cellmtl.task_mode": ckpt["model_spec"]["mode"],
        "cellmtl.time_head": ckpt["model_spec"].get("time_head", "shared"),
        # input channels = these frames (hour offsets, oldest first) x the channels above; null = one frame
        "cellmtl.temporal_context_hours": json.dumps(ckpt.get("temporal_context_hours")),
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

        ckpt = load_checkpoint(checkpoint)
        if (ckpt.get("normalizer") or {}).get("floor"):
            # (x - lo) / (hi - lo + floor) would be scale_range's eps, but bioimageio.core 0.11 ignores eps
            # (ScaleRange.from_proc_descr drops it), so the package would not reproduce this model.
            raise BadInputError(
                f"checkpoint {checkpoint} uses data.normalization.range_floor, which bioimage.io tools cannot "
                "reproduce yet; export it with --format onnx, or train with range_floor: 0"
            )
        if ckpt.get("temporal_context_hours"):
            # a bioimage.io model takes one image; stacking earlier frames is a step its tools cannot do
            raise BadInputError(
                f"checkpoint {checkpoint} stacks frames of data.temporal_context_hours; bioimage.io packages "
                "take one image, so export it with --format onnx (its metadata lists the offsets)"
            )

        return export_bioimageio(checkpoint, out)
    return export_onnx(checkpoint, out)
