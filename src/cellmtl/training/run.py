"""`training.strategy` (finetune, probe, lp_ft) and `train`, the entry point of `cellmtl train`."""


from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellmtl import distributed
from cellmtl.config import Config
from cellmtl.errors import BadInputError
from cellmtl.metrics import (
    format_metrics,
)
from cellmtl.reports.html import write_report
from cellmtl.runtime import make_loader
from cellmtl.training import probe
from cellmtl.training.loop import (
    calibration_loader,
    check_finite_weights,
    finish,
    fit,
    recalibrate_batchnorm,
    validate,
)
from cellmtl.training.rundir import close_logger, rss_mib, write_metrics_csv
from cellmtl.training.selection import VAL_LOG_KEYS
from cellmtl.training.state import Setup, save_checkpoints, setup
from cellmtl.weighting import fixed_weights, weighted_total


def probe_heads(s: Setup) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """Fit the linear heads on the frozen backbone's features of the training frames (once each, no augmentation;
    cellmtl.training.probe), its BatchNorm statistics first re-estimated on those frames (unless
    training.bn_recalibration_samples is 0); returns (training losses as `train_*_loss`, val metrics, the chosen
    strengths)."""
    cfg = s.cfg
    loader = functools.partial(make_loader, batch_size=cfg.training.batch_size, num_workers=cfg.data.num_workers,
                               device=s.device)
    # BatchNorm statistics of these frames, not of ImageNet ("AdaBN"), as every later validation recalibrates them
    # (training.bn_recalibration_samples): lp_ft's heads must fit the features its fine-tuning starts from.
    recalibrate_batchnorm(s.model, calibration_loader(s), s.device, s.amp_dtype)
    oriented = probe.dataset_features(s.model, s.calib_ds, loader, s.device)
    index = s.calib_ds.index
    # Each orientation's features a training row of its own (model.average_rotations: 8 per frame; the network
    # averages them, which a linear head turns into the mean of the 8 rows' outputs). Measured against fitting
    # on the averaged features: docs/VALIDATION.md, "What else was tried on the probe".
    rows = oriented.reshape(-1, oriented.shape[-1])
    try:
        chosen = probe.fit_heads(s.model, rows, index.repeat(s.model.orientations),
                                 balanced=cfg.data.balance != "none")
    except ValueError as exc:
        raise BadInputError(f"training.strategy {cfg.training.strategy}: {exc}") from None
    feats = oriented.mean(1)
    with torch.no_grad():
        out = s.model.heads(torch.from_numpy(feats).to(s.device))
        hours = torch.from_numpy(np.nan_to_num(index.time_target)).to(s.device)
        losses = s.loss_fn(out, torch.from_numpy(index.infected.astype(np.float32)).to(s.device),
                           s.model.scale_time(hours), torch.from_numpy(np.isfinite(index.time_target)).to(s.device))
    losses["total"] = weighted_total(losses, *fixed_weights(cfg))
    train = {f"train_{k}_loss": float(losses[k]) for k in ("total", "cls", "reg")}
    val, _ = validate(s, s.val_ds)
    turned = f" in {s.model.orientations} orientations each" if s.model.orientations > 1 else ""
    s.logger.info("probe: linear heads fitted on %d frozen-feature frames%s (%s); val: %s", len(feats), turned,
                  ", ".join(f"{k} {v:g}" for k, v in chosen.items()),
                  format_metrics(val, [k for k in VAL_LOG_KEYS if k in val]).replace(": ", ":"))
    return train, val, chosen


def fit_probe(s: Setup) -> dict[str, Any]:
    """`training.strategy: probe`: one 'epoch' that fits the heads; best.pt and last.pt are that model."""
    if s.start_epoch == 0:
        t0 = time.perf_counter()
        train, val, _ = probe_heads(s)
        s.wall_time_s += time.perf_counter() - t0
        s.history.append({"epoch": 1, "lr": 0.0, **train, **{f"val_{k}": v for k, v in val.items()},
                          "epoch_time_s": round(time.perf_counter() - t0, 3), "rss_mib": rss_mib()})
        s.best_epoch = 1
        check_finite_weights(s, 1)
        if s.ctx.is_main:
            save_checkpoints(s, 1)
            write_metrics_csv(s.history, s.run_dir / "metrics.csv")
    return finish(s)


def fit_strategy(s: Setup) -> dict[str, Any]:
    """`training.strategy`: finetune (the epoch loop), probe (`fit_probe`), lp_ft (the probe's heads, then the
    epoch loop from them, the backbone at optimizer.backbone_lr_scale)."""
    strategy = s.cfg.training.strategy
    if strategy == "probe":
        return fit_probe(s)
    if strategy == "lp_ft" and s.start_epoch == 0:
        t0 = time.perf_counter()
        _, val, chosen = probe_heads(s)
        s.wall_time_s += time.perf_counter() - t0
        s.probe = {**chosen, "val": val}
    return fit(s)


def train(cfg: Config | None, *, resume: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    """Train (or resume) a run; returns the run folder."""
    s = setup(cfg, resume=resume, overrides=overrides)
    try:
        fit_strategy(s)
        write_report(s.run_dir)
    finally:
        close_logger(s.logger)
        distributed.shutdown()
    return s.run_dir
