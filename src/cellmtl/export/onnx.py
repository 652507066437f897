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

from cellmtl.checkpoints import Checkpoint
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
    require_onnx()
    ckpt = Checkpoint.load(checkpoint)
    model = ckpt.network()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx_graph(ExportWrapper(model), model.spec.in_chans, ckpt.input_size, out, ["prob_infected", "time_hours"])
    add_metadata(out, ckpt)
    return out


def add_metadata(path: Path, ckpt: Checkpoint) -> None:
    import onnx

    proto = onnx.load(str(path))
    spec = ckpt.model_spec
    meta = {
        "cellmtl.normalizer": json.dumps(ckpt.normalizer.to_dict()),
        "cellmtl.channels": json.dumps(list(ckpt.channels)),
        "cellmtl.channel_names": json.dumps(ckpt.channel_names and list(ckpt.channel_names)),  # null: not named
        "cellmtl.image_size": str(ckpt.input_size),
        "cellmtl.task_mode": spec.mode,
        "cellmtl.time_head": spec.time_head,
        # input channels = these frames (hour offsets, oldest first) x the channels above; null = one frame
        "cellmtl.temporal_context_hours": json.dumps(ckpt.temporal_context_hours),
        # tiles: the graph scores one tile; a frame's prob_infected is the mean over its grid, its time the median
        "cellmtl.tiles": json.dumps(None if ckpt.tiles is None else vars(ckpt.tiles)),
        # already inside the graph (a pretrained stem's statistics after the normaliser); for the record only
        "cellmtl.backbone": spec.name,
        "cellmtl.input_mean": json.dumps(spec.input_mean and list(spec.input_mean)),
        "cellmtl.input_std": json.dumps(spec.input_std and list(spec.input_std)),
    }
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(path))


def require_onnx() -> None:
    """Both exports need the onnx packages of the `export` extra: one line saying how to get them."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise BadInputError("export needs the 'export' extra: pip install 'cellmtl[export]'") from None
