"""Distributed data-parallel training and prediction on PyTorch's own engine (`torchrun ... -m cellmtl train`,
`torchrun ... -m cellmtl predict`; `predict` shards the stacks over the ranks and rank 0 writes the tables).

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; `init()` joins the process group (nccl
on CUDA, gloo on CPU). Training then differs from one process in a few places only, each a hook here:

- every rank trains on a disjoint shard of the same epoch's sample order (`ShardedSampler`);
- gradients are averaged by `DistributedDataParallel`; the checkpoint holds the unwrapped model;
- validation runs on a shard per rank and the predictions are gathered, so every rank scores the WHOLE
  validation set identically (the same best epoch, the same early stopping on all ranks);
- rank 0 alone creates the run folder, writes files and logs; the others learn the folder by broadcast.

Without torchrun (or with WORLD_SIZE=1) all of this is a no-op and `DistContext.enabled` is False.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from cellmtl.engine import Predictions


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def requested() -> bool:
    """Was this process started by torchrun (or similar) as one of several?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str) -> DistContext:
    """Join the process group torchrun describes. `device_name` is `training.device`: nccl when it
    resolves to CUDA, gloo otherwise (CPU). Returns SINGLE when not launched as several processes."""
    if not requested():
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and not device_name.startswith("mps") and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)  # before init: nccl binds each rank to its own GPU
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
    if not ctx.is_main:  # rank 0 alone logs: the package's module loggers would repeat each INFO/WARNING per rank
        logging.getLogger("cellmtl").setLevel(logging.ERROR)
    return ctx


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """One GPU per process: rank `local_rank` uses cuda:`local_rank`."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank (any picklable object, e.g. the run folder's path)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_true(flag: bool, ctx: DistContext, device: torch.device) -> bool:
    """True only if `flag` is True on every rank. Ranks must agree to skip a step (a non-finite loss on
    one rank): a rank that skips backward while the others all-reduce gradients would hang them all.
    A CPU-GPU sync point, once per step."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (e.g. loss sums and sample counts, for epoch means of all ranks)."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The element-wise mean of a (detached) tensor over the ranks; `t` itself without DDP."""
    if not ctx.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / ctx.world_size


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` (which stays the object checkpoints are taken from).
    DDP broadcasts rank 0's initial weights, so every rank starts from the same model."""
    if not ctx.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard_indices(n: int, ctx: DistContext) -> np.ndarray:
    """Positions `rank, rank + world, ...` of 0..n-1: a disjoint cover of the set over the ranks (sizes
    differ by at most one; validation needs no padding because predictions are gathered, not reduced)."""
    return np.arange(ctx.rank, n, ctx.world_size)


class ShardedSampler(Sampler):
    """This rank's share of any epoch-aware sampler's order (e.g. `EpochSampler`, which may shuffle or
    subsample per epoch): every rank draws the same full order from the seeded base sampler, then keeps
    positions `rank::world_size`. The order is padded by wrapping around to a multiple of the world size,
    so every rank takes the same number of steps (DDP's collectives need that); at most world_size - 1
    samples appear twice an epoch, as with torch's DistributedSampler."""

    def __init__(self, base: Sampler, ctx: DistContext) -> None:
        self.base, self.ctx = base, ctx

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator:
        order = list(self.base)
        if not order:
            return iter([])
        w = self.ctx.world_size
        total = -(-len(order) // w) * w
        order += (order * (total // len(order) + 1))[: total - len(order)]
        return iter(order[self.ctx.rank :: w])

    def __len__(self) -> int:
        return -(-len(self.base) // self.ctx.world_size)  # type: ignore[arg-type]


def seed_rank(seed: int, epoch: int, ctx: DistContext) -> None:
    """Under DDP, reseed the global RNG (dropout) per (seed, epoch, rank): ranks draw different dropout
    masks, and a resumed run draws the same ones as an uninterrupted run on every rank (only rank 0's
    RNG state is in the checkpoint)."""
    if ctx.enabled:
        torch.manual_seed(int(np.random.SeedSequence([seed, epoch, ctx.rank]).generate_state(1)[0]))


def gather_predictions(preds: Predictions, positions: np.ndarray, n: int, ctx: DistContext) -> Predictions:
    """Every rank's shard predictions (rows at `positions` of a split of `n` frames), reassembled in the
    split's order, on every rank: every array field and every `extra` output, so scoring under DDP sees
    what a single process sees (gaussian_nll's log-variance, per_class outputs)."""
    parts = gather_objects((positions, preds), ctx)

    def merge(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        first = next((a for a in arrays if a is not None), None)  # a rank with an empty shard has no arrays
        if first is None:
            return None
        out = np.empty((n, *first.shape[1:]), dtype=first.dtype)  # per_class outputs are [B, 2]
        for (pos, _), a in zip(parts, arrays, strict=True):
            if a is not None:
                out[pos] = a
        return out

    names = [f.name for f in fields(Predictions) if f.name not in ("n", "extra", "maps")]
    merged = {f: merge([getattr(p, f) for _, p in parts]) for f in names}
    keys = next((p.extra.keys() for _, p in parts if p.extra), ())
    extra = {k: merge([p.extra[k] if p.extra else None for _, p in parts]) for k in keys} or None
    maps = None
    if any(p.maps is not None for _, p in parts):  # tile maps differ in shape between stacks: a list, by position
        maps = [None] * n
        for pos, p in parts:
            for i, m in zip(pos, p.maps or [], strict=False):
                maps[int(i)] = m
    return Predictions(n=n, **merged, extra=extra, maps=maps)


def average_grads(params: list[torch.Tensor], ctx: DistContext) -> None:
    """Average gradients of parameters that live outside the DDP module (e.g. the learned task weights
    of `multitask.weighting: uncertainty`), so every rank takes the same step with them."""
    if not ctx.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= ctx.world_size
