"""`cellmtl evaluate`: score a trained run's checkpoint on its val or test split."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cellmtl.checkpoints import config_from_checkpoint, load_checkpoint, model_from_checkpoint, resolve_checkpoint
from cellmtl.data.dataset import TimeCourseDataset, load_experiment
from cellmtl.data.transforms import Normalizer
from cellmtl.errors import BadInputError
from cellmtl.inference import make_loader, prediction_rows, run_model, write_csv
from cellmtl.losses import MultiTaskLoss
from cellmtl.metrics import format_metrics
from cellmtl.reporting import write_run_plots
from cellmtl.training import pick_device, score, val_arrays

LOG_KEYS = ("total_loss", "cls_auc", "cls_acc", "cls_f1", "reg_mae", "reg_rmse", "reg_mae_infected",
            "reg_mae_uninfected")


def checkpoint_path(run: Path, checkpoint: str) -> Path:
    if checkpoint in ("best", "last"):
        return resolve_checkpoint(run, checkpoint)
    return resolve_checkpoint(checkpoint)


def evaluate_run(run: str | Path, *, checkpoint: str = "best", split: str = "val") -> Path:
    """Write `evaluation_<split>.json`, `predictions_<split>.csv` and plots into the run folder; returns
    the JSON path."""
    run = Path(run)
    if not run.is_dir():
        raise BadInputError(f"run folder not found: {run}")
    ckpt_path = checkpoint_path(run, checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    cfg = config_from_checkpoint(ckpt)
    exp = load_experiment(cfg, splits=ckpt["splits"])
    if not exp.split_records(split):
        raise BadInputError(f"run {run} has no {split} split")
    index = exp.index(split, getattr(cfg.data.frames, split), cfg.data.pre_onset)
    ds = TimeCourseDataset(exp.infos, [r.stack_id for r in exp.records], index, channels=ckpt["channels"],
                           image_size=ckpt["image_size"], normalizer=Normalizer.from_dict(ckpt["normalizer"]))
    device = pick_device(cfg.training.device)
    model = model_from_checkpoint(ckpt).to(device)
    loader = make_loader(ds, batch_size=cfg.training.batch_size, num_workers=cfg.data.num_workers, device=device)
    preds = run_model(model, loader, device, progress=cfg.training.progress, desc=f"evaluate {split}")
    loss_fn = MultiTaskLoss(cfg.task.mode, cfg.multitask.classification_weight, cfg.multitask.regression_weight)
    metrics = score(model.cpu(), loss_fn, index, preds)
    write_csv(prediction_rows(ds, preds, exp.records), run / f"predictions_{split}.csv")
    plots = write_run_plots(run, [], val_arrays(ds, preds), subdir=f"plots/evaluation_{split}")
    result: dict[str, Any] = {
        "split": split,
        "checkpoint": str(ckpt_path),
        "epoch": int(ckpt["epoch"]),
        "n_frames": len(ds),
        "n_stacks": int(len(np.unique(index.stack))),
        "metrics": metrics,
        "plots": [str(p) for p in plots],
    }
    out = run / f"evaluation_{split}.json"
    out.write_text(json.dumps(result, indent=2, allow_nan=False))
    print(f"{split} ({ckpt_path.name}, epoch {result['epoch']}, {len(ds)} frames): "
          f"{format_metrics(metrics, [k for k in LOG_KEYS if k in metrics])}", file=sys.stderr)
    return out
