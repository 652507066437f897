"""Training: `setup` validates and builds, `fit` loops, `validate` scores; the run folder of SPEC section 5.

Selection: the model of the epoch with the best `training.select_metric` on the validation split is
kept as `best.pt`; the test split, when there is one, is scored with those weights only.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cellmtl import distributed, probe
from cellmtl.checkpoints import Checkpoint, ResumeState, resolve_checkpoint
from cellmtl.config import Config, apply_overrides, config_from_dict, config_to_dict, dump_config
from cellmtl.data.dataset import (
    EpochSampler,
    Experiment,
    SampleIndex,
    TimeCourseDataset,
    balanced_sample_weights,
    build_normalizer,
    class_weights,
    load_experiment,
)
from cellmtl.data.tiles import tile_spec
from cellmtl.data.transforms import Normalizer
from cellmtl.engine import Predictions, prediction_arrays, prediction_rows, run_model, score
from cellmtl.errors import BadInputError, TrainingError
from cellmtl.fileio import write_csv, write_json
from cellmtl.losses import MultiTaskLoss, loss_from_config
from cellmtl.metrics import (
    CLS_METRICS,
    FLAT_SLOPE,
    SLOPE_METRICS,
    format_metrics,
    metric_direction,
)
from cellmtl.models import MultiTaskNet, build_model, spec_from_config, starting_weights
from cellmtl.predict import write_stack_views
from cellmtl.reports.html import write_report
from cellmtl.reports.plots import write_run_plots
from cellmtl.runtime import autocast_ctx, autocast_for, cpu_threads, make_loader, pick_device, progress_bar
from cellmtl.weighting import FixedWeighting, fixed_weights, weighted_total, weighting_from_config

MAX_BAD_STEPS = 5  # consecutive non-finite losses before a run stops


def new_run_dir(cfg: Config) -> Path:
    """`{output_dir}/{experiment_name}/{run_id}`, run_id sortable by time and unique."""
    parent = Path(cfg.output_dir) / cfg.experiment_name
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        run_dir = parent / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            time.sleep(0.001)
    raise RuntimeError(f"could not create a unique run folder in {parent}")


def make_logger(run_dir: Path, main: bool = True) -> logging.Logger:
    """A logger of this run only: train.log (appended on resume) and stderr. Under DDP only rank 0
    (`main`) logs; the other ranks' loggers print errors only."""
    logger = logging.getLogger(f"cellmtl.run.{run_dir.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
    if not main:
        logger.setLevel(logging.ERROR)
        logger.addHandler(logging.StreamHandler(sys.stderr))
        return logger
    fh = logging.FileHandler(run_dir / "train.log", mode="a", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(fh)
    logger.addHandler(sh)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)


@dataclass
class Setup:
    """Everything `fit` needs, built once from a validated config."""

    cfg: Config
    run_dir: Path
    device: torch.device
    exp: Experiment
    train_ds: TimeCourseDataset
    calib_ds: TimeCourseDataset  # training frames without augmentation, for BatchNorm statistics
    val_ds: TimeCourseDataset
    test_ds: TimeCourseDataset | None
    normalizer: Normalizer
    model: MultiTaskNet
    loss_fn: MultiTaskLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    logger: logging.Logger
    weighting: FixedWeighting = field(default_factory=FixedWeighting)  # multitask.weighting's state
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    best_epoch: int = 0
    wall_time_s: float = 0.0
    ctx: distributed.DistContext = distributed.SINGLE
    train_model: torch.nn.Module | None = None  # the DDP wrapper under torchrun; `model` stays unwrapped
    probe: dict[str, Any] | None = None  # lp_ft: the probe stage's chosen strengths and val metrics


def time_scaling(index: SampleIndex, fixed_scale: float | None) -> tuple[float, float]:
    """(shift, scale) hours for the time target: training mean, and std (or the configured scale).
    Scaling keeps SmoothL1 in its useful range whatever the experiment's length."""
    t = index.time_target[np.isfinite(index.time_target)]
    if len(t) == 0:
        return 0.0, fixed_scale or 1.0
    scale = fixed_scale or max(float(np.std(t)), 1.0)
    return float(np.mean(t)), scale


def resolve_pos_weight(cfg: Config, index: SampleIndex) -> float | None:
    pw = cfg.multitask.pos_weight
    if pw != "auto":
        return pw
    n_pos = int((index.infected == 1).sum())
    n_neg = int((index.infected == 0).sum())
    return n_neg / max(n_pos, 1)


def lr_lambda_factory(total_steps: int, warmup_steps: int):
    def lr_lambda(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return lr_lambda


def split_indices(cfg: Config, exp: Experiment) -> dict[str, SampleIndex | None]:
    """Each split's frames (None for an absent test split); an empty train or val split is a bad input."""
    d = cfg.data
    out: dict[str, SampleIndex | None] = {}
    for split in ("train", "val", "test"):
        if split == "test" and not exp.split_records("test"):
            out[split] = None
            continue
        index = exp.index(split, getattr(d.frames, split), d.pre_onset, cfg.multitask.uninfected_time)
        if len(index) < (2 if split == "train" else 1):
            raise BadInputError(
                f"the {split} split has {len(index)} frame(s) left after data.pre_onset and data.frames"
                + ("; it needs at least 2" if split == "train" else "")
            )
        out[split] = index
    return out


def datasets(
    cfg: Config, exp: Experiment, indices: dict[str, SampleIndex | None], normalizer: Normalizer
) -> tuple[TimeCourseDataset | None, ...]:
    d = cfg.data
    ids = [r.stack_id for r in exp.records]
    tiles = tile_spec(d)
    out = []
    for split, index in indices.items():
        if index is None:
            out.append(None)
            continue
        train = split == "train"
        out.append(
            TimeCourseDataset(
                exp.infos,
                ids,
                index.repeat(tiles.per_frame) if train and tiles is not None else index,
                channels=exp.channels,
                image_size=d.image_size,
                normalizer=normalizer,
                augment_cfg=d.augment if train else None,
                seed=cfg.seed,
                context_hours=d.temporal_context_hours,
                intervals=[r.frame_interval_hours for r in exp.records],
                tiles=tiles,
                random_tiles=train,
            )
        )
    return tuple(out)


def setup(cfg: Config | None, *, resume: str | Path | None = None, overrides: list[str] | None = None) -> Setup:
    """Validate inputs, create (or reopen) the run folder, build data, model and optimiser.

    On resume the config is the run's own (from last.pt) with `overrides` applied, so
    `--set training.epochs=N` extends a finished run."""
    ckpt = None
    if resume is not None:
        ckpt_path = resolve_checkpoint(resume, "last")
        ckpt = Checkpoint.load(ckpt_path)
        if ckpt.resume is None:
            raise BadInputError(f"checkpoint {ckpt_path} holds the model only (best.pt keeps no optimizer state); "
                                "resume from the run folder or its checkpoints/last.pt")
        cfg = config_from_dict(apply_overrides(config_to_dict(ckpt.config), overrides or []),
                               f"{ckpt_path} (+ --set)")
        run_dir = ckpt_path.parent.parent
    if cfg is None:
        raise BadInputError("train needs --config (or --resume RUN_DIR_OR_CKPT)")
    torch.manual_seed(cfg.seed)
    ctx = distributed.init(cfg.training.device)
    exp = load_experiment(cfg, splits=ckpt.splits if ckpt else None, trained=ckpt.trained_channels if ckpt else None)
    device = distributed.device_for(ctx, pick_device(cfg.training.device))
    if device.type == "cpu":
        procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if ctx.enabled else 1
        torch.set_num_threads(cpu_threads(cfg.training.num_threads, cfg.data.num_workers, procs))
    indices = split_indices(cfg, exp)
    train_index = indices["train"]
    assert train_index is not None  # split_indices guarantees a train split
    normalizer = ckpt.normalizer if ckpt else build_normalizer(cfg, exp, train_index)
    train_ds, val_ds, test_ds = datasets(cfg, exp, indices, normalizer)
    if cfg.data.cache == "memory":
        for ds in (train_ds, val_ds, test_ds):
            if ds is not None:
                ds.fill_cache()

    if ckpt is None:  # under DDP rank 0 creates the folder, the others learn its name
        run_dir = distributed.broadcast(new_run_dir(cfg) if ctx.is_main else None, ctx)
    logger = make_logger(run_dir, main=ctx.is_main)
    if ckpt is None:
        start = starting_weights(cfg)
        model = build_model(spec_from_config(cfg, len(exp.channels), start), start=start)
    else:  # resume: the run's own network; its weights come from last.pt
        model = MultiTaskNet(ckpt.model_spec)
    shift, scale = time_scaling(train_index, cfg.multitask.time_scale_hours)
    model.set_time_scaling(shift, scale)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    amp_dtype, needs_scaler = autocast_for(device, cfg.training.amp)
    optimizer = make_optimizer(cfg, model)
    weighting = weighting_from_config(cfg, device, functools.partial(distributed.mean_over_ranks, ctx=ctx))
    if weighting.parameters():  # uncertainty's log-variances learn with the model, without weight decay
        optimizer.add_param_group({"params": weighting.parameters(), "weight_decay": 0.0})
    steps_per_epoch = max(1, math.ceil(len(train_ds) / ctx.world_size) // cfg.training.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda_factory(steps_per_epoch * cfg.training.epochs, round(steps_per_epoch * cfg.training.warmup_epochs)),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)
    balance = class_weights(train_ds.index.infected) if cfg.data.balance == "weights" else None
    loss_fn = loss_from_config(cfg, resolve_pos_weight(cfg, train_ds.index), balance)
    calib_ds = copy.copy(train_ds)
    calib_ds.augment_cfg = None
    s = Setup(cfg, run_dir, device, exp, train_ds, calib_ds, val_ds, test_ds, normalizer, model, loss_fn, optimizer,
              scheduler, scaler, amp_dtype, logger, weighting, ctx=ctx)
    if ckpt is not None:
        restore(s, ckpt)
    elif ctx.is_main:
        write_run_files(s)
    s.train_model = distributed.wrap(model, ctx, device)  # after restore: DDP broadcasts rank 0's weights
    if cfg.training.compile:  # checkpoints and evaluation keep using the plain `model`
        s.train_model = torch.compile(s.train_model)
    if cfg.data.cache == "memory":
        mib = sum(d.cache_bytes() for d in (train_ds, val_ds, test_ds) if d is not None) / 2**20
        logger.info("data.cache: memory holds %d frames in %.0f MiB", len(train_ds) + len(val_ds)
                    + (len(test_ds) if test_ds is not None else 0), mib)
    return s


def backbone_lr_scale(cfg: Config) -> float:
    """`optimizer.backbone_lr_scale`, resolved: 1 for finetune, 0.1 for lp_ft (whose heads start fitted, so a small
    step keeps the pretrained features from being distorted before the heads agree with them)."""
    scale = cfg.optimizer.backbone_lr_scale
    return scale if scale is not None else (0.1 if cfg.training.strategy == "lp_ft" else 1.0)


def make_optimizer(cfg: Config, model: MultiTaskNet) -> torch.optim.Optimizer:
    """AdamW over the model; with a backbone_lr_scale other than 1, two groups (`backbone` at lr x the scale, then
    `heads`), else one, as before the option existed (so older runs resume). The schedule scales every group."""
    lr, wd, scale = cfg.optimizer.lr, cfg.optimizer.weight_decay, backbone_lr_scale(cfg)
    if scale == 1.0:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    backbone = list(model.backbone.parameters())
    ids = {id(p) for p in backbone}
    heads = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{"params": backbone, "lr": lr * scale, "name": "backbone"},
                              {"params": heads, "lr": lr, "name": "heads"}], lr=lr, weight_decay=wd)


def restore(s: Setup, ckpt: Checkpoint) -> None:
    r = ckpt.resume
    assert r is not None  # setup checked it
    s.model.load_state_dict(ckpt.model)
    s.optimizer.load_state_dict(r.optimizer)
    s.scheduler.load_state_dict(r.scheduler)
    if r.scaler:
        s.scaler.load_state_dict(r.scaler)
    torch.set_rng_state(r.rng["torch"])
    if torch.cuda.is_available() and r.rng.get("cuda"):
        torch.cuda.set_rng_state_all(r.rng["cuda"])
    if r.weighting:
        s.weighting.load_state_dict(r.weighting)
    s.history = list(r.history)
    s.start_epoch = ckpt.epoch
    s.best_epoch = r.best_epoch
    s.wall_time_s = r.wall_time_s
    if not s.ctx.is_main:
        return
    dump_config(s.cfg, s.run_dir / "config.yaml")  # --set on resume changes the resolved config
    write_metrics_csv(s.history, s.run_dir / "metrics.csv")
    s.logger.info("resumed %s at epoch %d of %d", s.run_dir, s.start_epoch, s.cfg.training.epochs)


def write_run_files(s: Setup) -> None:
    dump_config(s.cfg, s.run_dir / "config.yaml")
    rows = [
        {"stack_id": r.stack_id, "group": r.group, "condition": r.condition, "split": s.exp.splits[r.stack_id]}
        for r in s.exp.records
        if r.stack_id in s.exp.splits
    ]
    write_csv(rows, s.run_dir / "splits.csv", ["stack_id", "group", "condition", "split"])
    counts = {sp: sum(1 for r in rows if r["split"] == sp) for sp in ("train", "val", "test")}
    s.logger.info("run folder: %s", s.run_dir)
    s.logger.info(
        "stacks: %s | frames: train %d, val %d%s | device %s | model %s (%d channels) | task %s",
        ", ".join(f"{k} {v}" for k, v in counts.items()),
        len(s.train_ds),
        len(s.val_ds),
        f", test {len(s.test_ds)}" if s.test_ds is not None else "",
        s.device,
        s.cfg.model.name,
        len(s.exp.channels),
        s.cfg.task.mode,
    )


def make_checkpoint(s: Setup, epoch: int) -> Checkpoint:
    """This epoch's checkpoint with the resume state (last.pt); `without_resume()` of it is best.pt."""
    metric = s.cfg.training.select_metric
    resume = ResumeState(
        optimizer=s.optimizer.state_dict(),
        scheduler=s.scheduler.state_dict(),
        scaler=s.scaler.state_dict() if s.scaler.is_enabled() else {},
        rng={"torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        history=s.history,
        best_epoch=s.best_epoch,
        best_metric=best_val_metrics(s).get(metric) if s.best_epoch else None,
        select_metric=metric,
        wall_time_s=s.wall_time_s,
        weighting=s.weighting.state_dict(),
    )
    luts = s.exp.infos[0].luts  # the reference stack's ImageJ colours, for predict's channel-order check
    return Checkpoint(
        model={k: v.detach().cpu() for k, v in s.model.state_dict().items()},
        model_spec=s.model.spec,
        config=s.cfg,
        normalizer=s.normalizer,
        channels=tuple(s.exp.channels),
        channel_names=None if s.exp.channel_names is None else tuple(s.exp.channel_names),
        channel_luts=None if luts is None else tuple(luts),
        splits=dict(s.exp.splits),
        epoch=epoch,
        run_id=s.run_dir.name,
        metrics=val_metrics(s.history[-1]) if s.history else None,
        resume=resume,
    )


def save_checkpoints(s: Setup, epoch: int) -> None:
    """last.pt every epoch (the resume state); best.pt, the model alone, when this epoch is the best."""
    ckpt = make_checkpoint(s, epoch)
    folder = s.run_dir / "checkpoints"
    if s.best_epoch == epoch:
        ckpt.without_resume().save(folder / "best.pt")
    ckpt.save(folder / "last.pt")


def write_metrics_csv(history: list[dict[str, Any]], path: Path) -> None:
    rows = [{k: ("" if v is None else v) for k, v in h.items()} for h in history]
    write_csv(rows, path)


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
    net = s.train_model or s.model
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


TIE_TOL = 1e-4


@torch.no_grad()
def recalibrate_batchnorm(model: MultiTaskNet, loader, device: torch.device, max_samples: int,
                          amp_dtype: torch.dtype | None = None) -> None:
    """Re-estimate BatchNorm running statistics of the backbone on training frames with the current
    weights ("precise BN"). With a few hundred frames an epoch, the running averages lag far behind fast-
    changing weights and eval-mode outputs swing wildly between epochs; exact statistics remove that."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or max_samples <= 0:
        return
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    model.backbone.train()
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    seen = 0
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast_ctx(device, amp_dtype):
            model.features(x)
        seen += x.shape[0]
        if seen >= max_samples:
            break
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.train(was_training)


def is_better(val: dict[str, float | None], best: dict[str, float | None] | None, metric: str) -> bool:
    """Does `val` beat `best` on `metric`? Ties (within 1e-4, common once AUC saturates at 1.0) go to the
    lower validation total_loss, so a saturated AUC does not freeze the choice at the first perfect epoch."""
    value = val.get(metric)
    if value is None or math.isnan(value):
        return False
    if best is None or best.get(metric) is None:
        return True
    ref = best[metric]
    if abs(value - ref) <= TIE_TOL and metric != "total_loss":
        loss, ref_loss = val.get("total_loss"), best.get("total_loss")
        return loss is not None and ref_loss is not None and loss < ref_loss
    return value > ref if metric_direction(metric) == "max" else value < ref


VAL_LOG_KEYS = ("total_loss", "cls_auc", "cls_acc", "reg_mae", "reg_rmse")


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
    calib_loader = make_loader(s.calib_ds, batch_size=cfg.training.batch_size, num_workers=nw, device=s.device,
                               drop_last=len(s.calib_ds) > cfg.training.batch_size)
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
        recalibrate_batchnorm(s.model, calib_loader, s.device, cfg.training.bn_recalibration_samples, s.amp_dtype)
        val, _ = (validate_sharded if s.ctx.enabled else validate)(s, s.val_ds, val_loader)
        log.info("Epoch %d/%d", epoch, cfg.training.epochs)
        log.info("train - total_loss: %.4f | cls_loss: %.4f | reg_loss: %.4f",
                 train["train_total_loss"], train["train_cls_loss"], train["train_reg_loss"])
        log.info("val: %s", format_metrics(val, [k for k in VAL_LOG_KEYS if k in val]).replace(": ", ":"))
        s.wall_time_s += time.perf_counter() - t0
        row = {"epoch": epoch, "lr": lr, **weights, **train, **{f"val_{k}": v for k, v in val.items()},
               "epoch_time_s": round(time.perf_counter() - t0, 3), "rss_mib": rss_mib()}
        s.history.append(row)
        improved = is_better(val, best_val_metrics(s) if s.best_epoch else None, metric)
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


def rss_mib() -> float | None:
    """Resident memory of this process now (MiB; Linux), logged per epoch to show memory stays flat."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


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


def val_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """A history row's validation metrics, without the `val_` prefix."""
    return {k.removeprefix("val_"): v for k, v in row.items() if k.startswith("val_")}


def best_val_metrics(s: Setup) -> dict[str, Any]:
    """Validation metrics of the best epoch so far, read back from the history (history row e is epoch e)."""
    return val_metrics(s.history[s.best_epoch - 1])


def selection_hint(history: list[dict[str, Any]], best_epoch: int, select_metric: str) -> str | None:
    """A note when best.pt was chosen by a classification metric and another epoch's time error was much
    lower: AUC often saturates in the first epochs, before the time head has learned, and a user reading
    only best.pt's metrics would not see that a better-balanced epoch exists."""
    if select_metric not in CLS_METRICS or not 1 <= best_epoch <= len(history):
        return None
    maes = {e: float(h["val_reg_mae"]) for e, h in enumerate(history, start=1)
            if h.get("val_reg_mae") is not None and math.isfinite(float(h["val_reg_mae"]))}
    chosen = maes.get(best_epoch)
    if chosen is None:
        return None
    epoch = min(maes, key=maes.__getitem__)
    low = maes[epoch]
    if chosen - low < max(0.5, 0.2 * chosen):
        return None
    other = history[epoch - 1].get(f"val_{select_metric}")
    other_txt = f", {select_metric} {float(other):.3f}" if other is not None else ""
    return (f"note: best.pt is epoch {best_epoch} by {select_metric} (reg_mae {chosen:.2f} h); epoch {epoch} "
            f"reached reg_mae {low:.2f} h{other_txt}. If the time estimate matters, select by total_loss "
            "(training.select_metric) or use last.pt")


def time_head_note(val: dict[str, Any], pretrained: bool = False) -> str | None:
    """A note when, at best.pt, the predicted time hardly changes inside the val stacks of a class: the
    time head then gives each new well about one value (its MAE can still look moderate), and `predict`'s
    onset estimates for such wells mean little. Measured on a hold-out experiment with 8 training wells
    (docs/VALIDATION.md, "Quality on unseen data"), where this was the case for every infected val stack."""
    flat = [(k.removeprefix("reg_slope_"), float(val[k])) for k in SLOPE_METRICS
            if val.get(k) is not None and float(val[k]) < FLAT_SLOPE]
    if not flat:
        return None
    what = " and ".join(f"{c} stacks (slope {v:.2f})" for c, v in flat)
    remedy = ("more training wells help (docs/VALIDATION.md, \"Quality on unseen data\")" if pretrained else
              "more training wells help, and so do pretrained weights: model.name mobilenet_v2 with model.weights "
              "(or model.pretrained) and training.strategy probe (docs/GUIDE.md, \"Few wells? Start from pretrained "
              "weights\")")
    return (f"note: inside the val {what} the predicted time hardly follows the clock (1 = it does): the "
            "time head gives each new well about one value, so do not read time or est_onset_hour from it for "
            f"such wells; {remedy}")


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


def probe_heads(s: Setup) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """Fit the linear heads on the frozen backbone's features of the training frames (once each, no augmentation;
    cellmtl.probe), its BatchNorm statistics first re-estimated on those frames (unless
    training.bn_recalibration_samples is 0); returns (training losses as `train_*_loss`, val metrics, the chosen
    strengths)."""
    cfg = s.cfg
    loader = functools.partial(make_loader, batch_size=cfg.training.batch_size, num_workers=cfg.data.num_workers,
                               device=s.device)
    # BatchNorm statistics of these frames, not of ImageNet ("AdaBN"), as every later validation recalibrates them
    # (training.bn_recalibration_samples): lp_ft's heads must fit the features its fine-tuning starts from.
    recalibrate_batchnorm(s.model, loader(s.calib_ds), s.device, cfg.training.bn_recalibration_samples, s.amp_dtype)
    feats = probe.dataset_features(s.model, s.calib_ds, loader, s.device)
    try:
        chosen = probe.fit_heads(s.model, feats, s.calib_ds.index, balanced=cfg.data.balance != "none")
    except ValueError as exc:
        raise BadInputError(f"training.strategy {cfg.training.strategy}: {exc}") from None
    index = s.calib_ds.index
    with torch.no_grad():
        out = s.model.heads(torch.from_numpy(feats).to(s.device))
        hours = torch.from_numpy(np.nan_to_num(index.time_target)).to(s.device)
        losses = s.loss_fn(out, torch.from_numpy(index.infected.astype(np.float32)).to(s.device),
                           s.model.scale_time(hours), torch.from_numpy(np.isfinite(index.time_target)).to(s.device))
    losses["total"] = weighted_total(losses, *fixed_weights(cfg))
    train = {f"train_{k}_loss": float(losses[k]) for k in ("total", "cls", "reg")}
    val, _ = validate(s, s.val_ds)
    s.logger.info("probe: linear heads fitted on %d frozen-feature frames (%s); val: %s", len(feats),
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
