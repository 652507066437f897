"""`cellmtl evaluate`: score a trained run's checkpoint on its val or test split."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from cellmtl.checkpoints import Checkpoint, resolve_checkpoint
from cellmtl.data.dataset import load_experiment
from cellmtl.engine import prediction_arrays, prediction_rows, run_model, score
from cellmtl.errors import BadInputError
from cellmtl.evaluation.review import write_error_review
from cellmtl.evaluation.timeresolved import binned_metrics, bootstrap_ci, earliest_reliable_hour, per_stack_metrics
from cellmtl.fileio import write_csv, write_json
from cellmtl.losses import loss_from_config
from cellmtl.predict import write_stack_views
from cellmtl.reports.html import write_report
from cellmtl.reports.plots import plot_time_bins, write_run_plots
from cellmtl.runtime import make_loader, pick_device
from cellmtl.weighting import fixed_weights

LOG_KEYS = (  # printed with their bootstrap CIs (losses have none)
    "cls_auc",
    "cls_acc",
    "cls_f1",
    "reg_mae",
    "reg_rmse",
    "reg_mae_infected",
    "reg_mae_uninfected",
    "reg_coverage90",
    "reg_slope_infected",  # within-stack slope of predicted on true time (1 = follows the clock); no CI
    "reg_slope_uninfected",
)


def checkpoint_path(run: Path, checkpoint: str) -> Path:
    if checkpoint in ("best", "last"):
        return resolve_checkpoint(run, checkpoint)
    return resolve_checkpoint(checkpoint)


def evaluate_run(run: str | Path, *, checkpoint: str = "best", split: str = "val", top_k: int = 12,
                 device: str | None = None) -> Path:
    """Write `evaluation_<split>.json`, `predictions_<split>.csv`, plots and the error review
    (`errors_<split>.csv/.png`: the `top_k` worst frames per task) into the run folder; returns the JSON path."""
    run = Path(run)
    if top_k < 1:
        raise BadInputError(f"--top-k must be at least 1, got {top_k}")
    if not run.is_dir():
        raise BadInputError(f"run folder not found: {run}")
    ckpt_path = checkpoint_path(run, checkpoint)
    ckpt = Checkpoint.load(ckpt_path)
    cfg = ckpt.config
    exp = load_experiment(cfg, splits=ckpt.splits, trained=ckpt.trained_channels)
    if not exp.split_records(split):
        raise BadInputError(f"run {run} has no {split} split")
    index = exp.index(split, getattr(cfg.data.frames, split), cfg.data.pre_onset, cfg.multitask.uninfected_time)
    intervals = [r.frame_interval_hours for r in exp.records]
    ds = ckpt.dataset(exp.infos, [r.stack_id for r in exp.records], index, intervals)
    device = pick_device(device or cfg.training.device)
    model = ckpt.network().to(device)
    loader = make_loader(ds, batch_size=cfg.training.batch_size, num_workers=cfg.data.num_workers, device=device)
    preds = run_model(model, loader, device, progress=cfg.training.progress, desc=f"evaluate {split}",
                      keep_maps=ds.tiles is not None)
    loss_fn = loss_from_config(cfg)
    metrics = score(model.cpu(), loss_fn, index, preds, fixed_weights(cfg))
    write_csv(prediction_rows(ds, preds, exp.records), run / f"predictions_{split}.csv")
    arrays = prediction_arrays(index, preds)
    plots = write_run_plots(run, [], arrays, subdir=f"plots/evaluation_{split}")
    ids = [exp.records[int(k)].stack_id for k in index.stack]
    bins = binned_metrics(index.hours, arrays, bin_hours=3.0)
    bins_png = plot_time_bins(bins, run / "plots" / f"evaluation_{split}" / "metrics_vs_time.png")
    plots += [bins_png] if bins_png else []
    plots += write_stack_views(run / "plots" / f"evaluation_{split}", ds, preds, exp.records)
    errors = write_error_review(run, split, arrays, ids, index.frame, index.hours, ds.load_image, top_k)
    per_stack = per_stack_metrics(ids, arrays)
    write_csv(per_stack, run / f"per_stack_{split}.csv")
    result: dict[str, Any] = {
        "split": split,
        "checkpoint": str(ckpt_path),
        "epoch": ckpt.epoch,
        "n_frames": len(ds),
        "n_stacks": int(len(np.unique(index.stack))),
        "metrics": metrics,
        "ci95_bootstrap_over_stacks": bootstrap_ci(ids, arrays, n_boot=1000, seed=cfg.seed),
        "time_bins_3h": bins,
        "earliest_hour_auc_ge_0.99_two_bins": earliest_reliable_hour(bins),
        "per_stack": per_stack,
        "plots": [str(p) for p in plots],
        "error_review": [str(p) for p in errors],
    }
    out = run / f"evaluation_{split}.json"
    write_json(out, result)
    write_report(run)
    print(summary_text(result), file=sys.stderr)
    return out


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def summary_text(result: dict[str, Any]) -> str:
    """What `evaluate` prints: headline metrics with 95% CIs, the time-binned table, per-stack rows."""
    m, ci = result["metrics"], result["ci95_bootstrap_over_stacks"]
    lines = [
        f"{result['split']} ({Path(result['checkpoint']).name}, epoch {result['epoch']}, "
        f"{result['n_frames']} frames, {result['n_stacks']} stacks)"
    ]
    for k in (k for k in LOG_KEYS if k in m):
        band = ci.get(k)
        lines.append(f"  {k:20s} {_num(m[k])}" + (f"  [95% CI {band[0]:.3f}, {band[1]:.3f}]" if band else ""))
    lines.append("  hours      n    cls_auc  cls_acc  reg_mae  mae_inf  mae_uninf")
    for b in result["time_bins_3h"]:
        lines.append(
            f"  {b['hour_start']:4g}-{b['hour_end']:<4g} {b['n']:4d}  "
            + "  ".join(
                _num(b.get(k)).rjust(7)
                for k in ("cls_auc", "cls_acc", "reg_mae", "reg_mae_infected", "reg_mae_uninfected")
            )
        )
    early = result["earliest_hour_auc_ge_0.99_two_bins"]
    lines.append(f"  AUC >= 0.99 in two consecutive bins from hour: {_num(early, 'g')}")
    for r in result["per_stack"]:
        lines.append(
            f"  stack {r['stack_id']:<16s} {r['condition']:<10s} n={r['n']:<4d} "
            f"acc={_num(r.get('cls_acc'))} mae={_num(r.get('reg_mae'), '.2f')} h"
        )
    return "\n".join(lines)
