"""Checkpoints: one typed `Checkpoint`, the only reader and writer of checkpoint files.

On disk a checkpoint is a plain dict of tensors and primitives (loadable with `torch.load(...,
weights_only=True)` by anyone), written atomically: a crash at any moment leaves either the old complete file
or the new complete file, never a torn one, so a kill at any point leaves a loadable best.pt and last.pt.

- `best.pt`: what predict, evaluate and export need (the network, its config, normalisation, channels, tiles)
  and the epoch's metrics; no optimizer state.
- `last.pt`: the same plus `ResumeState` (optimizer, scheduler, scaler, RNG, history, selection), for --resume.

Every field is stored once: the input size and temporal context are read from the config, the time scaling
from the network's own buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cellmtl.config import Config, config_from_dict, config_to_dict
from cellmtl.data.channels import TrainedChannels
from cellmtl.data.dataset import SampleIndex, TimeCourseDataset
from cellmtl.data.readers import StackInfo
from cellmtl.data.tiles import TileSpec, tile_spec
from cellmtl.data.transforms import Normalizer
from cellmtl.errors import BadInputError
from cellmtl.fileio import atomic_write
from cellmtl.models import ModelSpec, MultiTaskNet

FORMAT_VERSION = 2  # 1: every field also at the top level (image_size, time_shift, ...); still read
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng", "history", "best_epoch", "best_metric", "select_metric",
               "wall_time_s", "weighting")


@dataclass(frozen=True)
class ResumeState:
    """What `train --resume` needs beyond the network: only in last.pt."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    rng: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    best_metric: float | None
    select_metric: str | None
    wall_time_s: float
    weighting: dict[str, Any]


@dataclass(frozen=True)
class Checkpoint:
    """A trained network and everything needed to feed it as in training. `channels`: indices into the first
    training stack's channels; `channel_names` / `channel_luts`: their names / ImageJ colours where known;
    `metrics`: the validation metrics of `epoch`."""

    model: dict[str, torch.Tensor]
    model_spec: ModelSpec
    config: Config
    normalizer: Normalizer
    channels: tuple[int, ...]
    channel_names: tuple[str, ...] | None
    channel_luts: tuple[str, ...] | None
    splits: dict[str, str]
    epoch: int
    run_id: str
    metrics: dict[str, Any] | None = None
    resume: ResumeState | None = None

    @property
    def tiles(self) -> TileSpec | None:
        return tile_spec(self.config.data)

    @property
    def input_size(self) -> int:
        """The network's input side in pixels: the tile size, or the whole-frame image size."""
        return self.config.data.tile_size or self.config.data.image_size

    @property
    def temporal_context_hours(self) -> list[float] | None:
        return self.config.data.temporal_context_hours

    @property
    def trained_channels(self) -> TrainedChannels:
        return TrainedChannels(list(self.channels), None if self.channel_names is None else list(self.channel_names),
                               None if self.channel_luts is None else list(self.channel_luts),
                               self.config.data.channels is None)

    def network(self) -> MultiTaskNet:
        """The trained network, in eval mode, on the CPU."""
        net = MultiTaskNet(self.model_spec)
        net.load_state_dict(self.model)
        return net.eval()

    def dataset(self, infos: Sequence[StackInfo], stack_ids: Sequence[str], index: SampleIndex,
                intervals: Sequence[float] | None = None) -> TimeCourseDataset:
        """Frames prepared exactly as the network saw them in training: its channels, image size (or every tile
        of the grid), normalisation and temporal context (which needs each stack's frame interval, hours)."""
        if self.temporal_context_hours and intervals is None:
            raise ValueError("this checkpoint stacks a temporal context; pass the stacks' frame intervals")
        return TimeCourseDataset(infos, stack_ids, index, channels=list(self.channels),
                                 image_size=self.config.data.image_size, normalizer=self.normalizer,
                                 context_hours=self.temporal_context_hours, intervals=intervals, tiles=self.tiles)

    def without_resume(self) -> Checkpoint:
        return replace(self, resume=None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model": {k: v.detach().cpu() for k, v in self.model.items()},
            "model_spec": self.model_spec.to_dict(),
            "config": config_to_dict(self.config),
            "normalizer": self.normalizer.to_dict(),
            "channels": list(self.channels),
            "channel_names": None if self.channel_names is None else list(self.channel_names),
            "channel_luts": None if self.channel_luts is None else list(self.channel_luts),
            "splits": dict(self.splits),
            "epoch": self.epoch,
            "run_id": self.run_id,
            "metrics": self.metrics,
        }
        if self.resume is not None:
            out.update({k: getattr(self.resume, k) for k in RESUME_KEYS})
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "checkpoint") -> Checkpoint:
        """From the on-disk dict (format 1 or 2). Resume state where the file has it (last.pt)."""
        if not isinstance(raw, dict) or "model" not in raw or "model_spec" not in raw:
            raise BadInputError(f"{source} is not a cellmtl checkpoint")
        resume = None
        if "optimizer" in raw:
            resume = ResumeState(raw["optimizer"], raw["scheduler"], raw.get("scaler") or {}, raw["rng"],
                                 list(raw["history"]), int(raw["best_epoch"]), raw.get("best_metric"),
                                 raw.get("select_metric"), float(raw.get("wall_time_s", 0.0)),
                                 raw.get("weighting") or {})
        names, luts = raw.get("channel_names"), raw.get("channel_luts")
        return cls(model=raw["model"], model_spec=ModelSpec.from_dict(raw["model_spec"]),
                   config=config_from_dict(raw["config"], source), normalizer=Normalizer.from_dict(raw["normalizer"]),
                   channels=tuple(int(c) for c in raw["channels"]),
                   channel_names=None if names is None else tuple(names), channel_luts=None if luts is None else
                   tuple(luts), splits=dict(raw.get("splits") or {}), epoch=int(raw["epoch"]),
                   run_id=str(raw.get("run_id", "")), metrics=raw.get("metrics"), resume=resume)

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file, fsync, rename; the user's umask). Temp files of saves killed earlier
        (a run stopped mid-save) are removed: one process writes a run's checkpoints."""
        path = Path(path)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        data = self.to_dict()
        return atomic_write(path, lambda fh: torch.save(data, fh), durable=True)

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
        path = Path(path)
        if not path.is_file():
            raise _not_found(path)
        try:
            raw = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - corrupt or foreign files: one clear line
            raise BadInputError(f"checkpoint {path} could not be read ({exc.__class__.__name__}: {exc})") from None
        return cls.from_dict(raw, f"checkpoint {path}")


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
    if not p.is_file():
        raise _not_found(p)
    return p
