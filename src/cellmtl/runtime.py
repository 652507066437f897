"""Where and how a model runs: the device, CPU threads, autocast, and DataLoaders.

Passed down as arguments (no global state); the training loop, the engine and the commands all take their
device and precision from here.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from cellmtl.errors import BadInputError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"training.device {name!r}: no CUDA device is available here")
    return torch.device(name)


def cpu_threads(requested: int | None, processes: int = 1) -> int:
    """Threads for PyTorch's CPU ops. By default every core this process may use (its share, when
    `processes` training processes share the machine: torchrun's LOCAL_WORLD_SIZE), whatever the
    DataLoader workers: they mostly wait, and giving them cores of their own left the model a core short
    (measured in docs/PERFORMANCE.md, "CPU threads": on 2 cores, 1 thread beside 1-2 workers trained
    at 0.5-0.8x the speed of 2 threads)."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(processes, 1))


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
    sampler: torch.utils.data.Sampler | Iterable[int] | None = None,
    drop_last: bool = False,
    persistent: bool = False,
) -> DataLoader:
    """`persistent` keeps worker processes between epochs (the training loader); the others fork new
    workers when iterated, so a run holds one set of idle workers, not three. A dataset whose samples are
    whole tile grids gets batches of about `batch_size` tiles, not frames, also as a rank's `Subset` of it
    (DDP validation, predict under torchrun): a 2048 px field in 64 px tiles is 1024 tiles a frame."""
    base = ds
    while isinstance(base, Subset):
        base = base.dataset
    per_sample = getattr(base, "tiles_per_sample", lambda: 1)()
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




def interactive() -> bool:
    """Is stderr a terminal? Progress bars redraw lines with `\\r`, which fills captured logs with residue; when
    stderr is a file or a pipe, commands print plain lines instead."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 enabled: bool = True, leave: bool = False) -> tqdm:
    """A tqdm bar on stderr, drawn only when `enabled` and stderr is a terminal."""
    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=not (enabled and interactive()),
                file=sys.stderr, dynamic_ncols=True)


class Countdown:
    """Plain progress lines for long commands made of several runs (cv folds x seeds, compare arms x seeds):
    `step(what)` prints `cv: 3/6 done (fold 2 seed 1); about 4 min left`, the estimate from the mean so far."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.done, self.t0 = name, total, 0, time.perf_counter()

    def step(self, what: str) -> str:
        self.done += 1
        left = (time.perf_counter() - self.t0) / self.done * (self.total - self.done)
        eta = f"; about {format_duration(left)} left" if self.done < self.total else ""
        line = f"{self.name}: {self.done}/{self.total} done ({what}){eta}"
        print(line, file=sys.stderr)
        return line


def format_duration(seconds: float) -> str:
    """45 s, 4 min, 1 h 05 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"
