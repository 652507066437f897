"""`cellmtl predict`: predictions for new stacks (SPEC section 6), per frame and per stack."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from cellmtl import distributed
from cellmtl.checkpoints import Checkpoint
from cellmtl.config import FrameSelection
from cellmtl.data.channels import checkpoint_channels
from cellmtl.data.dataset import SampleIndex, TimeCourseDataset, probe_records, stack_index, with_file_times
from cellmtl.data.manifest import FROM_COMMAND_LINE, FROM_CONFIG, StackRecord, load_manifest
from cellmtl.engine import Predictions, prediction_rows, run_model
from cellmtl.errors import BadInputError
from cellmtl.fileio import file_stem, write_csv
from cellmtl.metrics import FLAT_SLOPE, theil_sen_slope
from cellmtl.reports.maps import montage_frames, plot_map_montage, plot_plate, write_map_tiff
from cellmtl.reports.plots import plot_onset_per_stack
from cellmtl.runtime import make_loader, pick_device


def records_from_paths(paths: Sequence[Path], frame_interval_hours: float, source: str) -> list[StackRecord]:
    """Unlabelled records for `predict PATH ...`: stack_id = file or folder name, made unique (the `path`
    column of the outputs tells `plate1/A1.tif` from `plate2/A1.tif`). `source`: where the interval came from."""
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
        row: dict = {"stack_id": sid, "path": frames[0].get("path"), "n_frames": len(frames)}
        probs = [f["prob_infected"] for f in frames if f["prob_infected"] is not None]
        mean = float(np.mean(probs)) if probs else None
        row["prob_infected"] = None if mean is None else round(mean, 6)
        row["pred_condition"] = None if mean is None else ("infected" if mean >= threshold else "uninfected")
        row["frac_frames_infected"] = (None if mean is None
                                       else round(float(np.mean(np.asarray(probs) >= threshold)), 3))
        onset, slope = None, None
        if mean is not None and mean >= threshold and frames[0]["pred_time_hours"] is not None:
            voters = [f for f in frames if float(f["prob_infected"]) >= threshold]
            votes = [f["hours_since_start"] - f["pred_time_hours"] for f in voters]
            onset = round(float(np.median(votes)), 3) if votes else None
            fit = theil_sen_slope([f["hours_since_start"] for f in voters], [f["pred_time_hours"] for f in voters])
            slope = None if fit is None else round(fit, 3)
        row["est_onset_hour"] = onset
        row["onset_fit_slope"] = slope
        row["condition"] = frames[0].get("condition")
        out.append(row)
    return out


def onset_note(summary: Sequence[dict]) -> str | None:
    """A line for the user when stacks predicted infected have `onset_fit_slope` under FLAT_SLOPE:
    their `est_onset_hour` is then an artefact of the frames' clock times, and a number in a CSV column is
    easy to take at face value."""
    onset_rows = [r for r in summary if r.get("est_onset_hour") is not None]
    flat = [r["stack_id"] for r in onset_rows
            if r.get("onset_fit_slope") is not None and r["onset_fit_slope"] < FLAT_SLOPE]
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
) -> tuple[Checkpoint, list[StackRecord], TimeCourseDataset]:
    """(checkpoint, records, dataset of every frame) for stacks the model has not seen, prepared as the
    checkpoint saw its training frames; labels optional. Shared by `predict` and `explain`, so both build
    the same input (channels, normalisation, temporal context) and the same targets."""
    ckpt = Checkpoint.load(checkpoint)
    cfg = ckpt.config
    interval = frame_interval_hours or cfg.data.frame_interval_hours
    if manifest is not None:
        records = load_manifest(manifest, default_interval=interval,
                                default_onset=cfg.multitask.infection_onset_hour, labelled=False)
    else:
        records = records_from_paths(list(paths), interval, FROM_CONFIG if frame_interval_hours is None
                                     else FROM_COMMAND_LINE)
    probed = probe_records(records)
    records = with_file_times(records, probed)
    infos, _, _ = checkpoint_channels(records, probed, ckpt.trained_channels)
    # Every frame; pre-onset frames of labelled infected stacks get negative time targets.
    every = FrameSelection()
    ut = cfg.multitask.uninfected_time
    parts = [stack_index(r, i, k, every, "keep", ut) for k, (r, i) in enumerate(zip(records, infos, strict=True))]
    intervals = [r.frame_interval_hours for r in records]
    ds = ckpt.dataset(infos, [r.stack_id for r in records], SampleIndex.concat(parts), intervals)
    return ckpt, records, ds


def well_summary(summary: Sequence[dict], records: Sequence[StackRecord], threshold: float = 0.5) -> list[dict]:
    """One row per well (stacks with a `well` column): its stacks, the mean of their `prob_infected`, the call it
    gives, the median `est_onset_hour` of its stacks that have one, and every manifest column its stacks agree
    on (plate-map columns such as moi or virus, the condition where known)."""
    by_id = {r.stack_id: r for r in records}
    wells: dict[str, list[dict]] = {}
    for row in summary:
        well = by_id[row["stack_id"]].extra.get("well", "").strip()
        if well:
            wells.setdefault(well, []).append(row)
    out = []
    for well, rows in wells.items():
        probs = [r["prob_infected"] for r in rows if r["prob_infected"] is not None]
        onsets = [r["est_onset_hour"] for r in rows if r.get("est_onset_hour") is not None]
        mean = float(np.mean(probs)) if probs else None
        row: dict = {"well": well, "stacks": len(rows), "stack_ids": "|".join(r["stack_id"] for r in rows),
                     "prob_infected": None if mean is None else round(mean, 6),
                     "pred_condition": None if mean is None else ("infected" if mean >= threshold else "uninfected"),
                     "est_onset_hour": round(float(np.median(onsets)), 3) if onsets else None}
        recs = [by_id[r["stack_id"]] for r in rows]
        shared = {"condition": recs[0].condition or None} if len({r.condition for r in recs}) == 1 else {}
        for key in recs[0].extra:
            values = {r.extra.get(key) for r in recs}
            if key not in ("well", "channels") and len(values) == 1:
                shared[key] = recs[0].extra[key]
        out.append({**row, **shared})
    return sorted(out, key=lambda r: (len(r["well"]), r["well"]))


def write_maps(ds: TimeCourseDataset, preds: Predictions, records: Sequence[StackRecord], folder: Path) -> None:
    """`<folder>/<stack_id>.tif` (T x 2 x rows x cols, one pixel per tile; 1 x 1 without tiles) and `.png`."""
    index = ds.index
    for k, rec in enumerate(records):
        pos = np.flatnonzero(index.stack == k)
        if not len(pos):
            continue
        if preds.maps is not None:
            maps = [preds.maps[i] for i in pos]
        else:  # whole frames: the map is the frame's own value
            nan = np.full(len(pos), np.nan, np.float32)
            prob = nan if preds.prob is None else preds.prob[pos]
            hours = nan if preds.time_pred is None else preds.time_pred[pos]
            maps = [np.array([[[p]], [[h]]], np.float32) for p, h in zip(prob, hours, strict=True)]
        stem = file_stem(rec.stack_id)
        write_map_tiff(maps, folder / f"{stem}.tif")
        shown = montage_frames(len(pos))
        plot_map_montage([ds.load_image(int(pos[j])).numpy() for j in shown], [maps[j] for j in shown],
                         [float(index.hours[pos[j]]) for j in shown], f"{rec.stack_id}: prob_infected per tile",
                         folder / f"{stem}.png")


def write_stack_views(folder: Path, ds: TimeCourseDataset, preds: Predictions, records: Sequence[StackRecord],
                      max_maps: int = 3) -> list[Path]:
    """The per-stack views of a split for its report: onset per stack, the plate view (stacks with a `well`)
    and, for a tile model, the maps of a few stacks (infected and mock alike); returns the PNGs written."""
    summary = stack_summary(prediction_rows(ds, preds, records))
    written = []
    onset = plot_onset_per_stack(summary, {r.stack_id: r.onset_hour for r in records if r.onset_hour is not None},
                                 folder / "onset_per_stack.png")
    written += [onset] if onset else []
    wells = well_summary(summary, records)
    if wells:
        written.append(plot_plate(wells, folder / "plate.png", title=folder.name))
    if preds.maps is not None:
        index, shown = ds.index, 0
        for k, rec in enumerate(records):
            pos = np.flatnonzero(index.stack == k)
            if not len(pos) or shown >= max_maps:
                continue
            picks = montage_frames(len(pos))
            written.append(plot_map_montage(
                [ds.load_image(int(pos[j])).numpy() for j in picks], [preds.maps[pos[j]] for j in picks],
                [float(index.hours[pos[j]]) for j in picks], f"{rec.stack_id} ({rec.condition or 'unlabelled'}): "
                "prob_infected per tile", folder / "maps" / f"{file_stem(rec.stack_id)}.png"))
            shown += 1
    return written


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
    maps: str | Path | None = None,
) -> Path:
    """Per-frame predictions CSV at `out` and `<stem>.stacks.csv` beside it; returns `out`. With a `well`
    column also `<stem>.wells.csv` and the plate view `<stem>.plate.png`; with `maps` a map per stack there.

    Uses the checkpoint's own channels, normalisation and image size (or tiles). Labels are optional: where the
    manifest gives a condition (and onset), `condition` and `time_target` columns are filled in.

    Under torchrun each process scores a shard of the stacks (stack k on rank k % world size, so each file is
    read by one process) on its own device; the predictions are gathered and rank 0 writes the same tables
    as one process would (SLURM: `srun torchrun ... -m cellmtl predict ...` scores a plate across nodes)."""
    ckpt, records, ds = new_stacks_dataset(checkpoint, manifest, paths, frame_interval_hours)
    ctx = distributed.init(device)
    try:
        dev = distributed.device_for(ctx, pick_device(device))
        model = ckpt.network().to(dev)
        positions = np.flatnonzero(ds.index.stack % ctx.world_size == ctx.rank)
        mine = ds if not ctx.enabled else Subset(ds, positions.tolist())
        loader = make_loader(mine, batch_size=batch_size, num_workers=num_workers, device=dev)
        preds = run_model(model.eval(), loader, dev, progress=progress and ctx.is_main, desc="predict",
                          keep_maps=maps is not None and ds.tiles is not None, tile_batch=batch_size)
        preds = distributed.gather_predictions(preds, positions, len(ds), ctx) if ctx.enabled else preds
    finally:
        distributed.shutdown()
    out = Path(out)
    if not ctx.is_main:
        return out
    rows = prediction_rows(ds, preds, records)
    write_csv(rows, out)
    summary = stack_summary(rows)
    write_csv(summary, out.with_name(f"{out.stem}.stacks.csv"))
    wells = well_summary(summary, records)
    if wells:
        write_csv(wells, out.with_name(f"{out.stem}.wells.csv"))
        plot_plate(wells, out.with_name(f"{out.stem}.plate.png"), title=out.stem)
    if maps is not None:
        write_maps(ds, preds, records, Path(maps))
    note = onset_note(summary)
    if note is not None:
        print(note, file=sys.stderr)
    return out
