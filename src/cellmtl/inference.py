"""Running a model over a Dataset, and turning its outputs into prediction tables (SPEC section 6)."""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cellmtl.data.dataset import TimeCourseDataset
from cellmtl.data.manifest import StackRecord
from cellmtl.models import MultiTaskResNet


@dataclass
class Predictions:
    """Per-frame outputs aligned with a dataset's sample index. `prob`/`time_pred` are None for the task a
    single-task model lacks. Times in hours."""

    index_pos: np.ndarray  # int64 position in the dataset
    prob: np.ndarray | None
    logit: np.ndarray | None
    time_pred: np.ndarray | None  # hours
    time_pred_scaled: np.ndarray | None

    def __len__(self) -> int:
        return len(self.index_pos)


def autocast_for(device: torch.device, amp: bool) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, needs GradScaler): bf16 where the GPU supports it, else fp16 + scaler; off on CPU."""
    if not amp or device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def collate_images(batch: list[dict]) -> dict:
    """Stack tensors; keep strings and numbers as lists (cheaper and clearer than default_collate)."""
    out: dict = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


def make_loader(
    ds: TimeCourseDataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    sampler: torch.utils.data.Sampler | None = None,
) -> DataLoader:
    kwargs: dict = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=4)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_images,
        drop_last=False,
        **kwargs,
    )


@torch.no_grad()
def run_model(
    model: MultiTaskResNet,
    loader: DataLoader,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    desc: str = "predict",
) -> Predictions:
    model.eval()
    logits, times, n = [], [], 0
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, file=sys.stderr):
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast_ctx(device, amp_dtype):
            out = model(x)
        if "infected" in out:
            logits.append(out["infected"].float().cpu())
        if "time" in out:
            times.append(out["time"].float().cpu())
        n += x.shape[0]
    logit = torch.cat(logits).numpy() if logits else None
    scaled = torch.cat(times) if times else None
    return Predictions(
        index_pos=np.arange(n),
        prob=None if logit is None else (1.0 / (1.0 + np.exp(-logit.astype(np.float64)))).astype(np.float32),
        logit=logit,
        time_pred=None if scaled is None else model.time_hours(scaled).numpy(),
        time_pred_scaled=None if scaled is None else scaled.numpy(),
    )


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
            "prob_infected": "" if preds.prob is None else round(float(preds.prob[k]), 6),
            "pred_condition": ""
            if preds.prob is None
            else ("infected" if preds.prob[k] >= threshold else "uninfected"),
            "pred_time_hours": "" if preds.time_pred is None else round(float(preds.time_pred[k]), 4),
        }
        row.update(rec.extra)
        label = int(idx.infected[k])
        row["condition"] = "" if label < 0 else ("infected" if label == 1 else "uninfected")
        t = float(idx.time_target[k])
        row["time_target"] = round(t, 6) if np.isfinite(t) else ""
        rows.append(row)
    return rows


def write_csv(rows: Sequence[dict], path: Path, columns: Sequence[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r)) if rows else []
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
