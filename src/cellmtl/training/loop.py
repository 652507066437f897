"""The epoch loop: `train_one_epoch` (non-finite steps skipped), `validate` (sharded under DDP), BatchNorm
recalibration, `fit`, and `finish` (best.pt scored on val and test, plots, results.json)."""


from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cellmtl import distributed
from cellmtl.checkpoints import Checkpoint
from cellmtl.data.dataset import (
    EpochSampler,
    TimeCourseDataset,
    balanced_sample_weights,
)
from cellmtl.engine import Predictions, prediction_arrays, prediction_rows, run_model, score
from cellmtl.errors import TrainingError
from cellmtl.fileio import write_csv, write_json
from cellmtl.metrics import (
    format_metrics,
)
from cellmtl.models import MultiTaskNet
from cellmtl.predict import write_stack_views
from cellmtl.reports.plots import write_run_plots
from cellmtl.runtime import autocast_ctx, make_loader, progress_bar
from cellmtl.training.rundir import rss_mib, write_metrics_csv
from cellmtl.training.selection import (
    VAL_LOG_KEYS,
    best_val_metrics,
    is_better,
    selection_hint,
    time_head_note,
    val_metrics,
)
from cellmtl.training.state import Setup, save_checkpoints
from cellmtl.weighting import fixed_weights

MAX_BAD_STEPS = 5  # consecutive non-finite losses before a run stops


def bn_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """BatchNorm running statistics: a forward pass in train mode updates them even when the step is
    then skipped, so a non-finite input would poison them unless they are restored."""
    return [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


def bad_step(s: Setup, epoch: int, step: int, bad: int, stack_ids: list[str], what: str) -> None:
    """Log a skipped step; MAX_BAD_STEPS in a row stop the run naming epoch, step and stacks."""
    stacks = sorted(set(stack_ids))
    s.logger.warning("non-finite %s at epoch %d step %d (stacks %s); step skipped", what, epoch, step, stacks[:5])
    if bad >= MAX_BAD_STEPS:
        raise TrainingError(
            f"{bad} non-finite {what} values in a row at epoch {epoch}, step {step}; "
            f"stacks in the last batch: {', '.join(stacks)}"
        )


def train_one_epoch(s: Setup, loader, epoch: int, bar: tqdm | None = None) -> dict[str, float]:
    """One pass over the training split. A non-finite loss (on any rank, under DDP) or non-finite
    gradients skip the step without touching weights, optimizer state or BatchNorm statistics;
    MAX_BAD_STEPS in a row stop the run, naming the epoch, step and stacks. `bar`: the run's overall
    progress bar (all epochs' steps, with the time left), advanced once per step."""
    s.model.train()
    net = s.train_model if s.train_model is not None else s.model  # `or` would ask a compiled module for len()
    sums = {"total": 0.0, "cls": 0.0, "reg": 0.0}
    n, bad = 0, 0
    buffers = bn_buffers(s.model)
    memory_format = torch.channels_last if s.device.type == "cuda" else torch.contiguous_format
    for step, batch in enumerate(loader):
        x = batch["image"].to(s.device, non_blocking=True).contiguous(memory_format=memory_format)
        infected = batch["infected"].to(s.device, non_blocking=True)
        has_time = batch["has_time"].to(s.device, non_blocking=True)
        time_scaled = s.model.scale_time(batch["time_h"].to(s.device, non_blocking=True))
        saved = [b.clone() for b in buffers]  # a few KiB: cheap next to a forward pass
        with autocast_ctx(s.device, s.amp_dtype):
            out = net(x)
        losses = s.loss_fn(out, infected, time_scaled, has_time)
        losses["total"] = s.weighting.combine(losses, s.model)
        s.optimizer.zero_grad(set_to_none=True)
        loss_ok = distributed.all_true(bool(torch.isfinite(losses["total"])), s.ctx, s.device)
        ok = loss_ok
        if loss_ok:
            s.scaler.scale(losses["total"]).backward()
            distributed.average_grads(s.weighting.parameters(), s.ctx)  # outside the DDP module
            s.scaler.unscale_(s.optimizer)
            clip = s.cfg.training.grad_clip_norm
            params = [p for p in s.model.parameters() if p.grad is not None]
            norm = (torch.nn.utils.clip_grad_norm_(params, clip) if clip is not None
                    else torch.nn.utils.get_total_norm([p.grad for p in params]))
            # With an fp16 GradScaler, inf gradients are routine (the scale is too high) and the scaler
            # skips the step itself; without one they mean the batch is bad. DDP averaged the gradients,
            # so every rank sees the same norm and takes the same decision.
            ok = s.scaler.is_enabled() or bool(torch.isfinite(norm))
        if not ok:
            bad += 1
            s.optimizer.zero_grad(set_to_none=True)
            if saved:
                torch._foreach_copy_(buffers, saved)
            bad_step(s, epoch, step, bad, list(batch["stack_id"]), "gradient" if loss_ok else "loss")
            continue
        bad = 0
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.scheduler.step()
        b = x.shape[0]
        for k in sums:
            sums[k] += float(losses[k].detach()) * b  # a sync per step; negligible next to the step itself
        n += b
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch}/{s.cfg.training.epochs}", loss=f"{sums['total'] / n:.4f}")
    totals = distributed.all_sum([*sums.values(), float(n)], s.ctx, s.device)  # under DDP: every rank's samples
    return {f"train_{k}_loss": v / max(totals[-1], 1) for k, v in zip(sums, totals, strict=False)}


def validate(s: Setup, ds: TimeCourseDataset, loader=None, keep_maps: bool = False
             ) -> tuple[dict[str, float | None], Predictions]:
    loader = loader or make_loader(ds, batch_size=s.cfg.training.batch_size, num_workers=0, device=s.device)
    preds = run_model(s.model, loader, s.device, amp_dtype=s.amp_dtype, keep_maps=keep_maps)
    return score(s.model, s.loss_fn, ds.index, preds, fixed_weights(s.cfg)), preds


def calibration_frames(n: int, max_samples: int) -> list[int]:
    """Which of `n` training samples re-estimate BatchNorm statistics: all of them, or `max_samples` evenly spaced.
    The index runs stack by stack, so its first `max_samples` would be the first wells only."""
    if max_samples <= 0:
        return []
    if n <= max_samples:
        return list(range(n))
    return np.linspace(0, n - 1, max_samples).round().astype(np.int64).tolist()


def calibration_loader(s: Setup, *, drop_last: bool = False) -> torch.utils.data.DataLoader | None:
    """The unaugmented training frames of `calibration_frames`, in index order, for `recalibrate_batchnorm`; None
    where `training.bn_recalibration_samples` is 0 (off). `drop_last` drops a last partial batch (where there is
    more than one batch)."""
    cfg = s.cfg
    frames = calibration_frames(len(s.calib_ds), cfg.training.bn_recalibration_samples)
    if not frames:
        return None
    return make_loader(s.calib_ds, batch_size=cfg.training.batch_size, num_workers=cfg.data.num_workers,
                       device=s.device, sampler=frames, drop_last=drop_last and len(frames) > cfg.training.batch_size)


@torch.no_grad()
def recalibrate_batchnorm(model: MultiTaskNet, loader: torch.utils.data.DataLoader | None, device: torch.device,
                          amp_dtype: torch.dtype | None = None) -> None:
    """Re-estimate BatchNorm running statistics of the backbone on training frames with the current
    weights ("precise BN"). With a few hundred frames an epoch, the running averages lag far behind fast-
    changing weights and eval-mode outputs swing wildly between epochs; exact statistics remove that. Every batch
    of `loader` counts (`calibration_loader` chooses the frames); None leaves the statistics as they are."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or loader is None:
        return
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    model.backbone.train()
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast_ctx(device, amp_dtype):
            model.features(x)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.train(was_training)


def train_sampler(s: Setup) -> EpochSampler:
    """Shuffled training frames; with `data.balance: sampler`, drawn so both classes come equally often."""
    balanced = balanced_sample_weights(s.train_ds.index.infected) if s.cfg.data.balance == "sampler" else None
    return EpochSampler(len(s.train_ds), shuffle=True, seed=s.cfg.seed, weights=balanced)


def build_loaders(s: Setup) -> tuple[Any, Any, Any, Any]:
    """(train sampler, train loader, val loader, BatchNorm-calibration loader) as `fit` uses them (and
    benchmarks/bench_train.py measures them). Under DDP the train sampler and the val loader cover this
    rank's shard."""
    cfg, nw = s.cfg, s.cfg.data.num_workers
    sampler: Any = train_sampler(s)
    if s.ctx.enabled:
        sampler = distributed.ShardedSampler(sampler, s.ctx)
    # Full batches only: a last batch of one sample breaks BatchNorm and gives noisy steps.
    train_loader = make_loader(s.train_ds, batch_size=cfg.training.batch_size, num_workers=nw, device=s.device,
                               sampler=sampler, drop_last=len(sampler) > cfg.training.batch_size, persistent=True)
    # Under DDP each rank predicts its own shard of the val split (validate_sharded gathers the rest).
    val_ds = torch.utils.data.Subset(s.val_ds, distributed.shard_indices(len(s.val_ds), s.ctx).tolist()) \
        if s.ctx.enabled else s.val_ds
    val_loader = make_loader(val_ds, batch_size=cfg.training.batch_size, num_workers=nw, device=s.device)
    calib_loader = calibration_loader(s, drop_last=True)
    return sampler, train_loader, val_loader, calib_loader


def fit(s: Setup) -> dict[str, Any]:
    """The epoch loop; returns results.json's content."""
    cfg, log = s.cfg, s.logger
    metric = cfg.training.select_metric
    assert metric is not None  # resolved by Config
    sampler, train_loader, val_loader, calib_loader = build_loaders(s)
    stale = s.start_epoch - s.best_epoch
    bar = progress_bar(total=(cfg.training.epochs - s.start_epoch) * len(train_loader), desc="train",
                       enabled=cfg.training.progress and s.ctx.is_main)
    for epoch in range(s.start_epoch + 1, cfg.training.epochs + 1):
        if cfg.training.early_stopping_patience and stale >= cfg.training.early_stopping_patience:
            log.info("early stopping: no %s improvement for %d epochs", metric, stale)
            break
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        distributed.seed_rank(cfg.seed, epoch, s.ctx)
        lr = next(g["lr"] for g in s.optimizer.param_groups if g.get("name") != "backbone")  # the heads' lr
        weights = s.weighting.weights()  # the weights this epoch trained with (gradnorm: at its start)
        train = train_one_epoch(s, train_loader, epoch, bar)
        s.weighting.end_epoch(train["train_cls_loss"], train["train_reg_loss"])
        # Under DDP every rank recalibrates on the same frames with the same weights: identical statistics.
        recalibrate_batchnorm(s.model, calib_loader, s.device, s.amp_dtype)
        val, _ = (validate_sharded if s.ctx.enabled else validate)(s, s.val_ds, val_loader)
        log.info("Epoch %d/%d", epoch, cfg.training.epochs)
        log.info("train - total_loss: %.4f | cls_loss: %.4f | reg_loss: %.4f",
                 train["train_total_loss"], train["train_cls_loss"], train["train_reg_loss"])
        log.info("val: %s", format_metrics(val, [k for k in VAL_LOG_KEYS if k in val]).replace(": ", ":"))
        s.wall_time_s += time.perf_counter() - t0
        row = {"epoch": epoch, "lr": lr, **weights, **train, **{f"val_{k}": v for k, v in val.items()},
               "epoch_time_s": round(time.perf_counter() - t0, 3), "rss_mib": rss_mib()}
        s.history.append(row)
        improved = is_better(val, best_val_metrics(s.history, s.best_epoch) if s.best_epoch else None, metric)
        check_finite_weights(s, epoch)
        if improved or not s.best_epoch:  # the first epoch is kept even when its metric is undefined
            if improved:
                log.info("✓ New best model! %s=%.4f", metric, val[metric])
            else:
                log.info("%s is undefined on this validation split (e.g. one class only); epoch %d is kept as "
                         "best.pt until an epoch has a value", metric, epoch)
            s.best_epoch, stale = epoch, 0
        else:
            stale += 1
        if s.ctx.is_main:
            save_checkpoints(s, epoch)
            write_metrics_csv(s.history, s.run_dir / "metrics.csv")
    bar.close()
    return finish(s)


def check_finite_weights(s: Setup, epoch: int) -> None:
    """Never checkpoint a broken model: non-finite weights or BatchNorm statistics stop the run before
    best.pt/last.pt are touched, so the last good checkpoint stays the one to resume from."""
    bad = [name for name, t in [*s.model.named_parameters(), *s.model.named_buffers()]
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise TrainingError(f"non-finite weights after epoch {epoch} ({', '.join(bad[:3])}); not checkpointed, "
                            f"resume from the last checkpoint with a lower optimizer.lr")


def validate_sharded(s: Setup, ds: TimeCourseDataset, loader) -> tuple[dict[str, float | None], Predictions]:
    """DDP validation over the WHOLE split: each rank predicts its shard (`loader`, over a Subset of `ds`
    from build_loaders), all predictions are gathered to every rank, and every rank scores the same full
    set (so all ranks agree on the best epoch and on early stopping). Cheaper than every rank predicting
    everything; exact, since eval-mode outputs do not depend on which frames share a batch."""
    positions = np.asarray(loader.dataset.indices)
    preds = run_model(s.model, loader, s.device, amp_dtype=s.amp_dtype)
    preds = distributed.gather_predictions(preds, positions, len(ds), s.ctx)
    return score(s.model, s.loss_fn, ds.index, preds, fixed_weights(s.cfg)), preds


def finish(s: Setup) -> dict[str, Any]:
    """Score val (and test) with best.pt's weights; write predictions, plots and results.json.
    Under DDP rank 0 alone does this (a single process scoring the whole splits)."""
    if not s.ctx.is_main:
        return {}
    best = Checkpoint.load(s.run_dir / "checkpoints" / "best.pt", map_location=s.device)
    s.model.load_state_dict(best.model)
    val, val_preds = validate(s, s.val_ds, keep_maps=s.val_ds.tiles is not None)
    write_csv(prediction_rows(s.val_ds, val_preds, s.exp.records), s.run_dir / "predictions_val.csv")
    try:
        write_run_plots(s.run_dir, s.history, prediction_arrays(s.val_ds.index, val_preds))
        write_stack_views(s.run_dir / "plots", s.val_ds, val_preds, s.exp.records)
    except ValueError as exc:  # e.g. non-finite predictions: keep the run, say why plots are missing
        s.logger.warning("plots not written: %s", exc)
    hint = selection_hint(s.history, s.best_epoch, s.cfg.training.select_metric)
    time_note = time_head_note(val, pretrained=s.model.spec.input_mean is not None or s.cfg.model.pretrained
                               or s.cfg.model.weights is not None)
    results: dict[str, Any] = {
        "run_dir": str(s.run_dir),
        "select_metric": s.cfg.training.select_metric,
        "selection_note": hint,  # null, or why another epoch may serve the time estimate better
        "time_note": time_note,  # null, or which val stacks' predicted time does not follow the clock
        "best_epoch": s.best_epoch,
        "best": val,
        "final": val_metrics(s.history[-1]),
        "history_length": len(s.history),
        "wall_time_s": round(s.wall_time_s, 2),
        "strategy": s.cfg.training.strategy,
    }
    if s.probe is not None:  # lp_ft: the linear probe it started from (probe: that is `best` itself)
        results["probe"] = s.probe
    if s.test_ds is not None:
        test, test_preds = validate(s, s.test_ds)
        results["test"] = test
        write_csv(prediction_rows(s.test_ds, test_preds, s.exp.records), s.run_dir / "predictions_test.csv")
        s.logger.info("test (best.pt, epoch %d): %s", s.best_epoch, format_metrics(test, VAL_LOG_KEYS))
    write_json(s.run_dir / "results.json", results)
    s.logger.info("best epoch %d: %s", s.best_epoch, format_metrics(val, VAL_LOG_KEYS))
    for note in (hint, time_note):
        if note is not None:
            s.logger.info(note)
    return results


