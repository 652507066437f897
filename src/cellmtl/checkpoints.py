"""Checkpoints: plain dicts of tensors and primitives, written atomically, loaded with weights_only.

A checkpoint carries everything `predict` needs (model spec, normalisation, channels, image size, time
scaling) and everything `--resume` needs (optimizer, scheduler, scaler, epoch, RNG, history).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cellmtl.config import Config, config_from_dict
from cellmtl.data.dataset import SampleIndex, TimeCourseDataset
from cellmtl.data.readers import StackInfo
from cellmtl.data.tiles import TileSpec
from cellmtl.data.transforms import Normalizer
from cellmtl.errors import BadInputError
from cellmtl.models import ModelSpec, MultiTaskNet

FORMAT_VERSION = 1


def previous_path(path: Path) -> Path:
    """Where `atomic_save` keeps the file it replaced: `last.pt` -> `last.prev.pt`."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_save(obj: dict[str, Any], path: Path, *, keep_previous: bool = True) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`: a crash at any moment
    leaves either the old complete file or the new complete file, never a torn one.

    With `keep_previous` the file being replaced is first hard-linked to `previous_path(path)`, so `path`
    exists at every instant and the last good checkpoint survives even if the new one turns out bad
    (e.g. a disk that lies about fsync). Temp files of saves killed earlier are removed here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp*"):  # temp files and their `.prev` links
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous and path.exists():
            link = Path(tmp + ".prev")
            try:
                os.link(path, link)
                os.replace(link, previous_path(path))
            except OSError:  # no hard links on this filesystem: a copy is as safe, only slower
                link.unlink(missing_ok=True)
                shutil.copy2(path, link)
                os.replace(link, previous_path(path))
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, tmp + ".prev"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise
    _fsync_dir(path.parent)


def _not_found(path: Path) -> BadInputError:
    """Users often type RUN/best.pt for RUN/checkpoints/best.pt (or pass the run folder itself): name the file
    that is there, so the one error line says how to fix the command."""
    hint = ""
    for guess in (path.parent / "checkpoints" / path.name, path / "checkpoints" / "best.pt"):
        if guess.is_file():
            hint = f" (did you mean {guess}?)"
            break
    return BadInputError(f"checkpoint not found: {path}{hint}")


def resolve_checkpoint(path_or_run: str | Path, which: str = "last") -> Path:
    """A run folder (-> checkpoints/<which>.pt) or a checkpoint file."""
    p = Path(path_or_run)
    if p.is_dir():
        p = p / "checkpoints" / f"{which}.pt"
    if not p.is_file() and not previous_path(p).is_file():
        raise _not_found(p)
    return p


def _read_checkpoint(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files: one clear line
        raise BadInputError(f"checkpoint {path} could not be read ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_spec" not in ckpt:
        raise BadInputError(f"checkpoint {path} is not a cellmtl checkpoint")
    return ckpt


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with `weights_only=True`; a missing or unreadable file falls back to the previous one that
    `atomic_save` kept beside it (with a warning), so one bad write never loses a run."""
    path = Path(path)
    prev = previous_path(path)
    try:
        if not path.is_file():
            raise _not_found(path)
        return _read_checkpoint(path, map_location)
    except BadInputError as exc:
        if not prev.is_file():
            raise
        logging.getLogger(__name__).warning("%s; using the previous checkpoint %s", exc, prev)
        return _read_checkpoint(prev, map_location)


def model_from_checkpoint(ckpt: dict[str, Any]) -> MultiTaskNet:
    model = MultiTaskNet(ModelSpec.from_dict(ckpt["model_spec"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def checkpoint_dataset(
    ckpt: dict[str, Any],
    infos: Sequence[StackInfo],
    stack_ids: Sequence[str],
    index: SampleIndex,
    intervals: Sequence[float] | None = None,
) -> TimeCourseDataset:
    """Frames prepared exactly as the checkpoint's model saw them in training: its channels, image size (or
    tiles: every tile of the grid), normalisation and temporal context (which needs each stack's frame
    interval, hours); no augmentation."""
    context = ckpt.get("temporal_context_hours")
    tiles = TileSpec(**ckpt["tiles"]) if ckpt.get("tiles") else None
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
        tiles=tiles,
    )


def config_from_checkpoint(ckpt: dict[str, Any]) -> Config:
    return config_from_dict(ckpt["config"], "checkpoint")
