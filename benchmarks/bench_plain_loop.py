#!/usr/bin/env python
"""cellmtl's training loop against a minimal hand-written PyTorch loop over the same frames.

    python benchmarks/bench_plain_loop.py [--size 96] [--batch 16] [--workers 1] [--rounds 3] [--quick]

The plain loop is what a user would write in an afternoon: a Dataset that reads one TIFF page with tifffile,
scales it by its own 1st/99.8th percentiles (numpy), resizes it with `F.interpolate`, flips it at random; a
torchvision resnet18 with a 2-channel stem and two outputs; `BCEWithLogits + SmoothL1`; AdamW. No
validation, no checks, no logging, no checkpoints. cellmtl runs its real epoch (`training.train_one_epoch`
on the loaders `cellmtl train` builds: non-finite checks, clipping, scheduler, augmentation, channels_last),
once with `data.cache: none` (the same per-sample work as the plain loop) and once with `data.cache: memory`.

Both sides use the same stacks on disk, batch size, DataLoader workers and torch threads (cellmtl's default
policy unless `--threads`); rounds alternate the order and the figures are medians (shared, noisy machines).
The last line is

    ratio_cache_none=<cellmtl/plain> ratio_cache_memory=<cellmtl/plain> plain_img_s=... cellmtl_img_s=...
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does, before torch is imported

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from bench_train import make_setup, write_experiment  # noqa: E402

from cellmtl.training import loop, rundir  # noqa: E402


class PlainFrames(torch.utils.data.Dataset):
    """One item = one (stack, frame): read the page, percentile-scale, resize, flip."""

    def __init__(self, manifest: Path, size: int) -> None:
        import csv

        rows = list(csv.DictReader(manifest.open()))
        self.items: list[tuple[Path, int, float, float]] = []
        for r in rows:
            path = manifest.parent / r["path"]
            with tifffile.TiffFile(path) as tf:
                n_frames = len(tf.pages) // 2
            infected = r["condition"] == "infected"
            for t in range(n_frames):
                self.items.append((path, t, float(infected), float(t)))
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, t, y, hours = self.items[i]
        img = tifffile.imread(path, key=[2 * t, 2 * t + 1]).astype(np.float32)  # (2, H, W)
        lo, hi = np.percentile(img, [1.0, 99.8], axis=(1, 2), keepdims=True)
        img = np.clip((img - lo) / np.maximum(hi - lo, 1e-6), 0, 1).astype(np.float32)
        x = F.interpolate(torch.from_numpy(img)[None], size=(self.size, self.size), mode="bilinear",
                          align_corners=False)[0]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        if torch.rand(()) < 0.5:
            x = x.flip(-2)
        return x, torch.tensor(y), torch.tensor(hours)


def plain_model() -> torch.nn.Module:
    net = torchvision.models.resnet18(num_classes=2)
    net.conv1 = torch.nn.Conv2d(2, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net


def plain_epoch(model, opt, loader) -> int:
    model.train()
    n = 0
    for x, y, hours in loader:
        out = model(x)
        loss = F.binary_cross_entropy_with_logits(out[:, 0], y) + F.smooth_l1_loss(out[:, 1], hours)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(x)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--stacks", type=int, default=12)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: cellmtl's policy)")
    ap.add_argument("--quick", action="store_true", help="a check of the script: 64 px, 4 stacks, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.size, args.stacks, args.frames, args.rounds = 64, 4, 8, 1
    args.model, args.compile, args.device = "resnet18", False, "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_experiment(Path(tmp) / "data", args.stacks, args.frames, args.size)
        setups = {c: make_setup(manifest, Path(tmp) / f"out_{c}", args, args.workers, c) for c in ("none", "memory")}
        threads = torch.get_num_threads()  # set by cellmtl's setup: the plain loop runs on the same
        loaders = {c: loop.build_loaders(s)[:2] for c, s in setups.items()}
        n_train = len(setups["none"].train_ds)
        torch.manual_seed(0)
        model, plain_ds = plain_model(), PlainFrames(manifest, args.size)
        # the same number of frames per epoch as cellmtl's training split, full batches only
        plain_ds = torch.utils.data.Subset(plain_ds, list(range(n_train)))
        plain_loader = torch.utils.data.DataLoader(plain_ds, batch_size=args.batch, shuffle=True, drop_last=True,
                                                   num_workers=args.workers, persistent_workers=args.workers > 0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        figures: dict[str, list[float]] = {"plain": [], "none": [], "memory": []}
        for r in range(args.rounds + 1):  # round 0: warm-up (worker start, page cache, cellmtl's frame cache)
            order = ["plain", "none", "memory"] if r % 2 else ["memory", "none", "plain"]
            for name in order:
                t0 = time.perf_counter()
                if name == "plain":
                    n = plain_epoch(model, opt, plain_loader)
                else:
                    sampler, loader = loaders[name]
                    sampler.set_epoch(r + 1)
                    loop.train_one_epoch(setups[name], loader, r + 1)
                    n = len(loader) * args.batch
                if r:
                    figures[name].append(n / (time.perf_counter() - t0))
            if r:
                print(f"round {r}: " + " | ".join(f"{k} {v[-1]:.1f} img/s" for k, v in figures.items()),
                      file=sys.stderr, flush=True)
        for s in setups.values():
            rundir.close_logger(s.logger)
    med = {k: float(np.median(v)) for k, v in figures.items()}
    print(f"ratio_cache_none={med['none'] / med['plain']:.3f} ratio_cache_memory={med['memory'] / med['plain']:.3f} "
          f"plain_img_s={med['plain']:.1f} cellmtl_img_s={med['none']:.1f} cellmtl_cached_img_s={med['memory']:.1f} "
          f"threads={threads} workers={args.workers} size={args.size} batch={args.batch}")


if __name__ == "__main__":
    main()
