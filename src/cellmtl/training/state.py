"""`setup` validates and builds a run's state (data, model, optimiser, loss, weighting), or restores it from last.pt;
the checkpoints it saves."""


from __future__ import annotations

import copy
import functools
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellmtl import distributed
from cellmtl.checkpoints import Checkpoint, ResumeState, resolve_checkpoint
from cellmtl.config import Config, apply_overrides, config_from_dict, config_to_dict, dump_config
from cellmtl.data.dataset import (
    Experiment,
    SampleIndex,
    TimeCourseDataset,
    build_normalizer,
    class_weights,
    load_experiment,
)
from cellmtl.data.tiles import tile_spec
from cellmtl.data.transforms import Normalizer
from cellmtl.errors import BadInputError
from cellmtl.fileio import write_csv
from cellmtl.losses import MultiTaskLoss, loss_from_config
from cellmtl.models import MultiTaskNet, build_model, spec_from_config, starting_weights
from cellmtl.runtime import autocast_for, cpu_threads, pick_device
from cellmtl.training.rundir import make_logger, new_run_dir, write_metrics_csv
from cellmtl.training.selection import best_val_metrics, val_metrics
from cellmtl.weighting import FixedWeighting, weighting_from_config


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
        torch.set_num_threads(cpu_threads(cfg.training.num_threads, procs))
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
        best_metric=best_val_metrics(s.history, s.best_epoch).get(metric) if s.best_epoch else None,
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
