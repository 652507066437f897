#!/usr/bin/env python
"""Data-loading benchmark: Dataset throughput vs raw tifffile reads, and peak RSS as an experiment grows.

    python benchmarks/bench_data.py [--stacks 8] [--frames 24] [--size 256] [--workers 2] [--quick]

1. Throughput: frames/s of `TimeCourseDataset` through a DataLoader (normalisation on, no resize, no
   augmentation) vs reading the same frames with `tifffile.TiffFile(...).asarray(key=...)` in a plain loop
   (files kept open). Both read every frame once after a warm-up pass, so both hit the page cache.
2. Memory: in a fresh subprocess each, build the experiment's sample index and iterate over every
   frame for an experiment of N stacks and one of 10 N stacks; report peak RSS of each.

Prints one result line per measurement and, last, `dataset_vs_raw=<ratio> rss_growth_10x=<ratio>`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from cellmtl.config import config_from_dict
from cellmtl.data.dataset import TimeCourseDataset, load_experiment
from cellmtl.data.transforms import Normalizer
from cellmtl.runtime import collate_images


def write_experiment(root: Path, n_stacks: int, n_frames: int, size: int) -> Path:
    """uint16 2-channel ImageJ hyperstacks (TCYX); cheap random content, real file layout."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 4000, size=(n_frames, 2, size, size), dtype=np.uint16)
    rows = ["stack_id,path,condition,infection_onset_hour"]
    for k in range(n_stacks):
        path = root / f"s{k:04d}.tif"
        tifffile.imwrite(path, frame, imagej=True, metadata={"axes": "TCYX"})
        rows.append(f"s{k:04d},{path.name},{'infected' if k % 2 == 0 else 'uninfected'},{'0' if k % 2 == 0 else ''}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def make_dataset(manifest: Path, size: int) -> TimeCourseDataset:
    cfg = config_from_dict({"data": {"manifest": str(manifest), "image_size": size, "val_fraction": 0.25}})
    exp = load_experiment(cfg)
    index = exp.index("train", cfg.data.frames.train, cfg.data.pre_onset)
    norm = Normalizer("dataset", (1.0, 99.8), (0.0, 0.0), (4000.0, 4000.0))
    ids = [r.stack_id for r in exp.records]
    return TimeCourseDataset(exp.infos, ids, index, channels=exp.channels, image_size=size, normalizer=norm)


def raw_reads(ds: TimeCourseDataset) -> float:
    """Frames/s of tifffile reading the dataset's frames, one `asarray(key=pages)` per frame."""
    files = {}
    t0 = time.perf_counter()
    for s, f in zip(ds.index.stack, ds.index.frame, strict=True):
        info = ds.readers[int(s)].info
        tf = files.get(info.path) or files.setdefault(info.path, tifffile.TiffFile(info.path))
        c = info.n_channels
        arr = tf.asarray(key=list(range(int(f) * c, int(f) * c + c)), series=0)
        assert arr.shape == (c, info.height, info.width)
    dt = time.perf_counter() - t0
    for tf in files.values():
        tf.close()
    return len(ds) / dt


def loader_reads(ds: TimeCourseDataset, workers: int, batch: int) -> float:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate_images,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    n = 0
    for b in loader:  # warm-up: workers start, files open
        n += len(b["image"])
        if n >= 2 * batch:
            break
    t0 = time.perf_counter()
    n = sum(len(b["image"]) for b in loader)
    return n / (time.perf_counter() - t0)


def rss_child(manifest: str, size: int) -> None:
    """Run in a subprocess: iterate over every frame once, print peak RSS (MiB)."""
    ds = make_dataset(Path(manifest), size)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=0, collate_fn=collate_images)
    n = sum(len(b["image"]) for b in loader)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"frames": n, "peak_rss_mib": peak}))


def peak_rss(manifest: Path, size: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(manifest), "--size", str(size)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stacks", type=int, default=8)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7, help="alternating repeats; medians are reported")
    ap.add_argument("--quick", action="store_true", help="small sizes, for CI")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.size)
        return
    if args.quick:
        args.stacks, args.frames, args.size = 4, 12, 128
    with tempfile.TemporaryDirectory() as tmp:
        small = write_experiment(Path(tmp) / "small", args.stacks, args.frames, args.size)
        ds = make_dataset(small, args.size)
        raw_reads(ds)  # warm the page cache for both
        # Alternate the measurements and keep medians: the machines here are shared and noisy.
        samples: dict[str, list[float]] = {"raw_tifffile_fps": []}
        for _ in range(args.repeats):
            samples["raw_tifffile_fps"].append(raw_reads(ds))
            for w in sorted({0, args.workers}):
                samples.setdefault(f"dataset_fps_workers{w}", []).append(loader_reads(ds, w, args.batch))
        results = {k: float(np.median(v)) for k, v in samples.items()}
        raw = results["raw_tifffile_fps"]
        best = max(v for k, v in results.items() if k.startswith("dataset"))
        for k, v in results.items():
            print(f"{k}={v:.0f}")
        big = write_experiment(Path(tmp) / "big", args.stacks * 10, args.frames, args.size)
        r1, r10 = peak_rss(small, args.size), peak_rss(big, args.size)
        print(f"peak_rss_mib_{args.stacks}_stacks={r1['peak_rss_mib']:.0f} ({r1['frames']} frames)")
        print(f"peak_rss_mib_{args.stacks * 10}_stacks={r10['peak_rss_mib']:.0f} ({r10['frames']} frames)")
        print(f"dataset_vs_raw={best / raw:.2f} rss_growth_10x={r10['peak_rss_mib'] / r1['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
