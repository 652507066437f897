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

from cellmtl.data.dataset import SampleIndex, TimeCourseDataset
from cellmtl.data.manifest import StackRecord
from cellmtl.metrics import FLAT_SLOPE
from cellmtl.models import MultiTaskResNet


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

    def __len__(self) -> int:
        return self.n


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
    drop_last: bool = False,
    persistent: bool = False,
) -> DataLoader:
    """`persistent` keeps worker processes between epochs (the training loader); the others fork new
    workers when iterated, so a run holds one set of idle workers, not three."""
    kwargs: dict = {}
    if num_workers > 0:
        # Workers' base seed from a private generator: it does not consume the global RNG (dropout), so a
        # resumed run draws the same as an uninterrupted one (augmentation is seeded per sample anyway).
        kwargs.update(persistent_workers=persistent, prefetch_factor=4, generator=torch.Generator().manual_seed(0))
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_images,
        drop_last=drop_last,
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
    extra: dict[str, list[torch.Tensor]] = {}
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, file=sys.stderr):
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast_ctx(device, amp_dtype):
            out = model(x)
        if "infected" in out:
            logits.append(out["infected"].float().cpu())
        if "time" in out:
            times.append(out["time"].float().cpu())
        for k in out.keys() - {"infected", "time"}:
            extra.setdefault(k, []).append(out[k].float().cpu())
        n += x.shape[0]
    logit = torch.cat(logits).numpy() if logits else None
    scaled = torch.cat(times) if times else None
    raw = {k: torch.cat(v).numpy() for k, v in extra.items()}
    std = None
    if "time_logvar" in raw:  # std on the scaled axis times the scale gives hours
        std = (np.exp(0.5 * np.clip(raw["time_logvar"], -10.0, 10.0)) * float(model.time_scale)).astype(np.float32)
    return Predictions(
        n=n,
        prob=None if logit is None else (1.0 / (1.0 + np.exp(-logit.astype(np.float64)))).astype(np.float32),
        logit=logit,
        time_pred=None if scaled is None else model.time_hours(scaled).numpy(),
        time_pred_scaled=None if scaled is None else scaled.numpy(),
        time_std=std,
        extra=raw or None,
    )


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
            "prob_infected": "" if preds.prob is None else round(float(preds.prob[k]), 6),
            "pred_condition": ""
            if preds.prob is None
            else ("infected" if preds.prob[k] >= threshold else "uninfected"),
            "pred_time_hours": "" if preds.time_pred is None else round(float(preds.time_pred[k]), 4),
        }
        if preds.time_std is not None:
            row["pred_time_std"] = round(float(preds.time_std[k]), 4)
        row["path"] = rec.path
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


def records_from_paths(paths: Sequence[Path], frame_interval_hours: float, source: str) -> list[StackRecord]:
    """Unlabelled records for `predict PATH ...`: stack_id = file or folder name, made unique (the `path`
    column of the outputs tells `plate1/A1.tif` from `plate2/A1.tif`). `source`: where the interval came from."""
    from cellmtl.errors import BadInputError

    out: list[StackRecord] = []
    seen: set[str] = set()
    for p in paths:
        if not Path(p).exists():
            raise BadInputError(f"file not found: {p}")
        base = Path(p).name.split(".")[0] or Path(p).name
        sid, k = base, 1
        while sid in seen:
            k += 1
            sid = f"{base}_{k}"
        seen.add(sid)
        out.append(StackRecord(sid, str(Path(p).resolve()), None, None, frame_interval_hours, 0.0, None, sid,
                               interval_source=source))
    return out


def theil_sen_slope(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Median of pairwise slopes (dy/dx) over pairs with distinct x: a line fit that a few wild points
    cannot move. None with fewer than two distinct x."""
    xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
    i, j = np.triu_indices(len(xa), k=1)
    dx = xa[j] - xa[i]
    keep = dx != 0
    return float(np.median((ya[j] - ya[i])[keep] / dx[keep])) if keep.any() else None


def stack_summary(rows: Sequence[dict], threshold: float = 0.5) -> list[dict]:
    """One row per stack: mean prob_infected, pred_condition, `frac_frames_infected` (the share of its frames
    at or above the threshold: how unanimous the call is, since a mean near the threshold can hide a stack
    split between the conditions) and, for stacks predicted infected,
    `est_onset_hour` = median over its frames predicted infected of `hours_since_start - pred_time_hours`
    (each such frame votes for when infection began; this is the least-absolute-deviation fit of
    `pred_time_hours = hours_since_start - onset`, a line of slope 1), and `onset_fit_slope`, the robust
    (Theil-Sen) slope of `pred_time_hours` against `hours_since_start` over the same frames: near 1 when the
    time head tracks the clock, so that the estimate means something; near 0 when it predicts one time for
    every frame, and then `est_onset_hour` merely follows the frames' clock times and must not be trusted."""
    by_stack: dict[str, list[dict]] = {}
    for r in rows:
        by_stack.setdefault(r["stack_id"], []).append(r)
    out = []
    for sid, frames in by_stack.items():
        row: dict = {"stack_id": sid, "path": frames[0].get("path", ""), "n_frames": len(frames)}
        probs = [float(f["prob_infected"]) for f in frames if f["prob_infected"] != ""]
        mean = float(np.mean(probs)) if probs else None
        row["prob_infected"] = "" if mean is None else round(mean, 6)
        row["pred_condition"] = "" if mean is None else ("infected" if mean >= threshold else "uninfected")
        row["frac_frames_infected"] = "" if mean is None else round(float(np.mean(np.asarray(probs) >= threshold)), 3)
        onset, slope = "", ""
        if mean is not None and mean >= threshold and frames[0]["pred_time_hours"] != "":
            voters = [f for f in frames if float(f["prob_infected"]) >= threshold]
            votes = [f["hours_since_start"] - f["pred_time_hours"] for f in voters]
            onset = round(float(np.median(votes)), 3) if votes else ""
            fit = theil_sen_slope([f["hours_since_start"] for f in voters], [f["pred_time_hours"] for f in voters])
            slope = "" if fit is None else round(fit, 3)
        row["est_onset_hour"] = onset
        row["onset_fit_slope"] = slope
        row["condition"] = frames[0].get("condition", "")
        out.append(row)
    return out


def onset_note(summary: Sequence[dict]) -> str | None:
    """A line for the user when stacks predicted infected have `onset_fit_slope` under FLAT_SLOPE:
    their `est_onset_hour` is then an artefact of the frames' clock times, and a number in a CSV column is
    easy to take at face value."""
    onset_rows = [r for r in summary if r.get("est_onset_hour", "") != ""]
    flat = [r["stack_id"] for r in onset_rows
            if r.get("onset_fit_slope", "") != "" and float(r["onset_fit_slope"]) < FLAT_SLOPE]
    if not flat:
        return None
    shown = ", ".join(flat[:5]) + (f" and {len(flat) - 5} more" if len(flat) > 5 else "")
    return (f"note: {len(flat)} of {len(onset_rows)} stacks predicted infected have onset_fit_slope under "
            f"{FLAT_SLOPE:g} ({shown}): their predicted time hardly follows the clock, so do not trust their "
            "est_onset_hour")


def new_stacks_dataset(
    checkpoint: str | Path,
    manifest: str | Path | None,
    paths: Sequence[Path],
    frame_interval_hours: float | None,
) -> tuple[dict, list[StackRecord], TimeCourseDataset]:
    """(checkpoint, records, dataset of every frame) for stacks the model has not seen, prepared as the
    checkpoint saw its training frames; labels optional. Shared by `predict` and `explain`, so both build
    the same input (channels, normalisation, temporal context) and the same targets."""
    from cellmtl.checkpoints import checkpoint_dataset, config_from_checkpoint, load_checkpoint
    from cellmtl.config import FrameSelection
    from cellmtl.data.channels import checkpoint_channels
    from cellmtl.data.dataset import probe_records, stack_index, with_file_times
    from cellmtl.data.manifest import FROM_COMMAND_LINE, FROM_CONFIG, load_manifest

    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_checkpoint(ckpt)
    interval = frame_interval_hours or cfg.data.frame_interval_hours
    if manifest is not None:
        records = load_manifest(manifest, default_interval=interval,
                                default_onset=cfg.multitask.infection_onset_hour, labelled=False)
    else:
        records = records_from_paths(list(paths), interval, FROM_CONFIG if frame_interval_hours is None
                                     else FROM_COMMAND_LINE)
    probed = probe_records(records)
    records = with_file_times(records, probed)
    infos, _, _ = checkpoint_channels(records, probed, ckpt)
    # Every frame; pre-onset frames of labelled infected stacks get negative time targets.
    every = FrameSelection()
    ut = cfg.multitask.uninfected_time
    parts = [stack_index(r, i, k, every, "keep", ut) for k, (r, i) in enumerate(zip(records, infos, strict=True))]
    intervals = [r.frame_interval_hours for r in records]
    ds = checkpoint_dataset(ckpt, infos, [r.stack_id for r in records], SampleIndex.concat(parts), intervals)
    return ckpt, records, ds


def predict(
    checkpoint: str | Path,
    *,
    out: str | Path,
    manifest: str | Path | None = None,
    paths: Sequence[Path] = (),
    device: str = "auto",
    batch_size: int = 32,
    frame_interval_hours: float | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Per-frame predictions CSV at `out` and `<stem>.stacks.csv` beside it; returns `out`.

    Uses the checkpoint's own channels, normalisation and image size. Labels are optional: where the
    manifest gives a condition (and onset), `condition` and `time_target` columns are filled in."""
    from cellmtl.checkpoints import model_from_checkpoint
    from cellmtl.training import pick_device

    ckpt, records, ds = new_stacks_dataset(checkpoint, manifest, paths, frame_interval_hours)
    dev = pick_device(device)
    model = model_from_checkpoint(ckpt).to(dev)
    loader = make_loader(ds, batch_size=batch_size, num_workers=num_workers, device=dev)
    preds = run_model(model.eval(), loader, dev, progress=progress, desc="predict")
    rows = prediction_rows(ds, preds, records)
    out = Path(out)
    write_csv(rows, out)
    summary = stack_summary(rows)
    write_csv(summary, out.with_name(f"{out.stem}.stacks.csv"))
    note = onset_note(summary)
    if note is not None:
        print(note, file=sys.stderr)
    return out
