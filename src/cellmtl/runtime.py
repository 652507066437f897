"""Where and how a model runs: the device, CPU threads, autocast, and DataLoaders.

Passed down as arguments (no global state); the training loop, the engine and the commands all take their
device and precision from here.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader, Dataset

from cellmtl.errors import BadInputError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"training.device {name!r}: no CUDA device is available here")
    return torch.device(name)


def cpu_threads(requested: int | None, num_workers: int, processes: int = 1) -> int:
    """Threads for PyTorch's CPU ops. By default the cores that DataLoader workers leave free: on small
    machines intra-op threads that compete with the workers (or with each other, on tiny 64-px tensors)
    make training several times slower, not faster. `processes`: training processes sharing this
    machine's cores (torchrun's LOCAL_WORLD_SIZE)."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(processes, 1) - num_workers)


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
    """Stack tensors; keep strings and numbers as lists (cheaper and clearer than default_collate). Tensors
    that differ in shape (the tile grids of fields of different sizes) stay a list."""
    out: dict = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        same = isinstance(vals[0], torch.Tensor) and all(v.shape == vals[0].shape for v in vals)
        out[key] = torch.stack(vals) if same else vals
    return out


def make_loader(
    ds: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    sampler: torch.utils.data.Sampler | None = None,
    drop_last: bool = False,
    persistent: bool = False,
) -> DataLoader:
    """`persistent` keeps worker processes between epochs (the training loader); the others fork new
    workers when iterated, so a run holds one set of idle workers, not three. A dataset whose samples are
    whole tile grids gets batches of about `batch_size` tiles, not frames."""
    per_sample = getattr(ds, "tiles_per_sample", lambda: 1)()
    if per_sample > 1 and sampler is None:
        batch_size = max(1, batch_size // per_sample)
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


