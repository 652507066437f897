"""Run a model over a Dataset and get typed predictions; score them; turn them into table rows.

`run_model` is the one place a model meets data outside the training step: validation, `evaluate`,
`predict`, `explain`, `cv`, `compare` and the exports' checks all go through it. Missing values are None
(or NaN in arrays) in memory; `cellmtl.fileio.write_csv` writes them as empty cells.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cellmtl.data.dataset import SampleIndex, TimeCourseDataset
from cellmtl.data.manifest import StackRecord
from cellmtl.losses import MultiTaskLoss
from cellmtl.metrics import compute_metrics, interval_coverage
from cellmtl.models import MultiTaskNet
from cellmtl.runtime import autocast_ctx, progress_bar
from cellmtl.weighting import weighted_total


@dataclass
class Predictions:
    """Per-frame outputs aligned with a dataset's sample index. `prob`/`time_pred` are None for the task a
    single-task model lacks. Times in hours."""

    n: int  # frames, in the dataset's index order
    prob: np.ndarray | None
    logit: np.ndarray | None
    time_pred: np.ndarray | None  # hours
    time_pred_scaled: np.ndarray | None
    time_std: np.ndarray | None = None  # hours; gaussian_nll models only
    extra: dict[str, np.ndarray] | None = None  # other raw outputs (time_per_class, time_logvar, ...), scaled axis
    maps: list[np.ndarray] | None = None  # tiled frames with run_model(keep_maps=True): [2, rows, cols] each

    def __len__(self) -> int:
        return self.n


def _tile_outputs(model: MultiTaskNet, tiles: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None,
                  chunk: int, memory_format: torch.memory_format) -> dict[str, torch.Tensor]:
    """The model on every tile of one frame `[K, C, s, s]`, `chunk` tiles at a time: each output `[K, ...]`."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, tiles.shape[0], chunk):
        x = tiles[start:start + chunk].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast_ctx(device, amp_dtype):
            out = model(x)
        for k, v in out.items():
            parts.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def frame_from_tiles(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One frame's outputs `[1, ...]` from its tiles' `[K, ...]` (`cellmtl.data.tiles.aggregate`'s rule): the
    logit of the mean probability; the median of the time and of every other output."""
    frame = {k: v.median(dim=0).values[None] for k, v in out.items() if k != "infected"}
    if "infected" in out:
        p = torch.sigmoid(out["infected"].double()).mean().clamp(1e-7, 1 - 1e-7)
        frame["infected"] = torch.logit(p).float()[None]
    return frame


@torch.no_grad()
def run_model(
    model: MultiTaskNet,
    loader: DataLoader,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "predict",
    keep_maps: bool = False,
    tile_batch: int = 64,
) -> Predictions:
    """Per-sample outputs in the loader's order. Samples that are tile grids (`image` `[K, C, s, s]` per frame)
    give one prediction per frame, aggregated from its tiles, which go through the model `tile_batch` at a
    time (memory stays that of a batch however large the field); `keep_maps` also keeps each frame's tile map
    (`Predictions.maps`)."""
    model.eval()
    outputs: dict[str, list[torch.Tensor]] = {}
    maps: list[np.ndarray] = []
    n = 0
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for batch in progress_bar(loader, desc=desc, enabled=progress):
        images = batch["image"]
        if "grid" in batch:  # tile grids: one frame at a time, its tiles in chunks of the loader's batch size
            for tiles, grid in zip(images, batch["grid"], strict=True):
                out = _tile_outputs(model, tiles, device, amp_dtype, tile_batch, memory_format)
                if keep_maps:
                    maps.append(tile_map(model, out, grid))
                for k, v in frame_from_tiles(out).items():
                    outputs.setdefault(k, []).append(v)
                n += 1
            continue
        x = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast_ctx(device, amp_dtype):
            out = model(x)
        for k, v in out.items():
            outputs.setdefault(k, []).append(v.float().cpu())
        n += x.shape[0]
    raw = {k: torch.cat(v) for k, v in outputs.items()}
    logit = raw.pop("infected").numpy() if "infected" in raw else None
    scaled = raw.pop("time") if "time" in raw else None
    extra = {k: v.numpy() for k, v in raw.items()}
    std = None
    if "time_logvar" in extra:  # std on the scaled axis times the scale gives hours
        std = (np.exp(0.5 * np.clip(extra["time_logvar"], -10.0, 10.0)) * float(model.time_scale)).astype(np.float32)
    return Predictions(
        n=n,
        prob=None if logit is None else (1.0 / (1.0 + np.exp(-logit.astype(np.float64)))).astype(np.float32),
        logit=logit,
        time_pred=None if scaled is None else model.time_hours(scaled).numpy(),
        time_pred_scaled=None if scaled is None else scaled.numpy(),
        time_std=std,
        extra=extra or None,
        maps=maps if keep_maps else None,
    )


def tile_map(model: MultiTaskNet, out: dict[str, torch.Tensor], grid: tuple[int, int]) -> np.ndarray:
    """One frame's tiles as a map: float32 `[2, rows, cols]`, `prob_infected` and time in hours (NaN for the
    task a single-task model lacks)."""
    rows, cols = grid
    prob = torch.sigmoid(out["infected"]) if "infected" in out else torch.full((rows * cols,), float("nan"))
    hours = model.time_hours(out["time"]) if "time" in out else torch.full((rows * cols,), float("nan"))
    return torch.stack([prob, hours]).reshape(2, rows, cols).numpy().astype(np.float32)


def prediction_arrays(index: SampleIndex, preds: Predictions) -> dict[str, np.ndarray | None]:
    """Labels and outputs as the keyword arguments of `metrics.compute_metrics` (and the `val` mapping of
    `reporting.write_run_plots`); the time entries are None for a model without a time head."""
    has_time = preds.time_pred is not None
    return {
        "infected": index.infected.astype(np.int64),
        "prob": preds.prob,
        "time_true": index.time_target if has_time else None,
        "time_pred": preds.time_pred,
        "time_mask": np.isfinite(index.time_target) if has_time else None,
    }


def prediction_rows(
    ds: TimeCourseDataset,
    preds: Predictions,
    records: Sequence[StackRecord],
    *,
    threshold: float = 0.5,
) -> list[dict]:
    """One dict per frame in SPEC section 6's columns, plus the manifest's extra columns and, where
    known, `condition` and `time_target`."""
    idx = ds.index
    rows = []
    for k in range(len(preds)):
        rec = records[int(idx.stack[k])]
        row: dict = {
            "stack_id": rec.stack_id,
            "frame": int(idx.frame[k]),
            "hours_since_start": round(float(idx.hours[k]), 6),
            "prob_infected": None if preds.prob is None else round(float(preds.prob[k]), 6),
            "pred_condition": None
            if preds.prob is None
            else ("infected" if preds.prob[k] >= threshold else "uninfected"),
            "pred_time_hours": None if preds.time_pred is None else round(float(preds.time_pred[k]), 4),
        }
        if preds.time_std is not None:
            row["pred_time_std"] = round(float(preds.time_std[k]), 4)
        row["path"] = rec.path
        row.update(rec.extra)
        label = int(idx.infected[k])
        row["condition"] = None if label < 0 else ("infected" if label == 1 else "uninfected")
        t = float(idx.time_target[k])
        row["time_target"] = round(t, 6) if np.isfinite(t) else None
        rows.append(row)
    return rows


NUMERIC_COLUMNS = ("hours_since_start", "prob_infected", "pred_time_hours", "pred_time_std", "time_target")


def read_prediction_rows(path: Path) -> list[dict]:
    """A predictions CSV (as `prediction_rows` wrote it) back into rows: its number columns as floats, empty
    cells as None."""
    with Path(path).open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["frame"] = int(r["frame"])
        for c in NUMERIC_COLUMNS:
            if c in r:
                r[c] = float(r[c]) if r[c] != "" else None
        for c in ("pred_condition", "condition"):
            if r.get(c) == "":
                r[c] = None
    return rows


def score(
    model: MultiTaskNet, loss_fn: MultiTaskLoss, index: SampleIndex, preds: Predictions, weights: tuple[float, float]
) -> dict[str, float | None]:
    """SPEC section 5's metrics and losses for a split, from collected predictions (hours); `total_loss` uses
    `weights` (`weighting.fixed_weights`: the validation total is the same whatever multitask.weighting)."""
    has_time = np.isfinite(index.time_target)
    out: dict[str, torch.Tensor] = {}
    if preds.logit is not None:
        out["infected"] = torch.from_numpy(preds.logit)
    if preds.time_pred_scaled is not None:
        out["time"] = torch.from_numpy(preds.time_pred_scaled)
    out.update({k: torch.from_numpy(v) for k, v in (preds.extra or {}).items()})
    with torch.no_grad():
        hours = torch.from_numpy(np.nan_to_num(index.time_target)).to(model.time_shift.device)
        t_scaled = model.scale_time(hours).cpu()
        losses = loss_fn(out, torch.from_numpy(index.infected.astype(np.float32)), t_scaled, torch.from_numpy(has_time))
    losses = {"total": weighted_total(losses, *weights), **losses}
    metrics: dict[str, float | None] = {f"{k}_loss": float(v) for k, v in losses.items()}
    metrics.update(compute_metrics(**prediction_arrays(index, preds), stack=index.stack))
    if preds.time_std is not None and preds.time_pred is not None:
        metrics["reg_coverage90"] = interval_coverage(index.time_target, preds.time_pred, preds.time_std)
    return metrics


