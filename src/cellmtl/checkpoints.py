"""Checkpoints: plain dicts of tensors and primitives, written atomically, loaded with weights_only.

A checkpoint carries everything `predict` needs (model spec, normalisation, channels, image size, time
scaling) and everything `--resume` needs (optimizer, scheduler, scaler, epoch, RNG, history).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cellmtl.config import Config, config_from_dict
from cellmtl.data.dataset import SampleIndex, TimeCourseDataset
from cellmtl.data.transforms import Normalizer
from cellmtl.errors import BadInputError
from cellmtl.io import StackInfo
from cellmtl.models import ModelSpec, MultiTaskResNet

FORMAT_VERSION = 1


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`: a crash at any moment
    leaves either the old complete file or the new complete file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def resolve_checkpoint(path_or_run: str | Path, which: str = "last") -> Path:
    """A run folder (-> checkpoints/<which>.pt) or a checkpoint file."""
    p = Path(path_or_run)
    if p.is_dir():
        p = p / "checkpoints" / f"{which}.pt"
    if not p.is_file():
        raise BadInputError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files: one clear line
        raise BadInputError(f"checkpoint {path} could not be read ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_spec" not in ckpt:
        raise BadInputError(f"checkpoint {path} is not a cellmtl checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> MultiTaskResNet:
    model = MultiTaskResNet(ModelSpec(**ckpt["model_spec"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def checkpoint_dataset(
    ckpt: dict[str, Any],
    infos: Sequence[StackInfo],
    stack_ids: Sequence[str],
    index: SampleIndex,
    intervals: Sequence[float] | None = None,
) -> TimeCourseDataset:
    """Frames prepared exactly as the checkpoint's model saw them in training: its channels, image size,
    normalisation and temporal context (which needs each stack's frame interval, hours); no augmentation."""
    context = ckpt.get("temporal_context_hours")
    if context and intervals is None:
        raise ValueError("this checkpoint stacks a temporal context; pass the stacks' frame intervals")
    return TimeCourseDataset(
        infos,
        stack_ids,
        index,
        channels=ckpt["channels"],
        image_size=int(ckpt["image_size"]),
        normalizer=Normalizer.from_dict(ckpt["normalizer"]),
        context_hours=context,
        intervals=intervals,
    )


def config_from_checkpoint(ckpt: dict[str, Any]) -> Config:
    return config_from_dict(ckpt["config"], "checkpoint")
