#!/usr/bin/env python
"""The CPU thread policy, chosen by measurement: training throughput for PyTorch threads x DataLoader workers.

    python benchmarks/bench_threads.py [--cores 0,1] [--sizes 64 128] [--rounds 2] [--quick]

Runs `benchmarks/bench_train.py` (the full training pipeline from TIFF files on disk, cache off) pinned to the
given cores with `taskset`, for every `training.num_threads` in 1..cores, `data.num_workers` in 0..2, plain and
zlib-compressed stacks, at each image size, plus cellmtl's default policy (`--threads` unset), all in one
sitting. Prints a Markdown table of train img/s (the median over rounds) and, last, the default's speed
against `num_threads=<cores>` with the default workers.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(cores: str, size: int, threads: int | None, workers: int, compress: bool, rounds: int) -> dict[str, float]:
    cmd = ["taskset", "-c", cores, sys.executable, str(HERE / "bench_train.py"), "--size", str(size), "--stacks", "8",
           "--frames", "16", "--rounds", str(rounds), "--batch", "16", "--workers", str(workers), "--cache", "none",
           "--device", "cpu"]
    cmd += ["--threads", str(threads)] if threads is not None else []
    cmd += ["--compress"] if compress else []
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if done.returncode != 0:
        raise SystemExit(f"bench_train failed ({' '.join(cmd)}): {done.stderr[-1500:]}")
    last = done.stdout.strip().splitlines()[-1]
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", last)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cores", default="0,1", help="taskset core list, e.g. 0,1 or 0-3")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="64 px, plain stacks, 1 round (a check of the script)")
    args = ap.parse_args()
    n_cores = int(subprocess.run(["taskset", "-c", args.cores, "nproc"], capture_output=True, text=True,
                                 check=True).stdout.strip())
    sizes, compressions = (args.sizes, (False, True)) if not args.quick else ([64], (False,))
    rounds = 1 if args.quick else args.rounds
    rows = []
    for size in sizes:
        for compress in compressions:
            for workers in (0, 1, 2):
                for threads in [*range(1, n_cores + 1), None]:
                    res = run(args.cores, size, threads, workers, compress, rounds)
                    rows.append((size, compress, workers, threads, res["train_img_s"], res.get("vs_best_model")))
                    print(f"{size} px {'zlib' if compress else 'plain'} workers={workers} "
                          f"threads={'default' if threads is None else threads}: {res['train_img_s']:.1f} img/s "
                          f"(vs best model-only {res.get('vs_best_model', float('nan')):.2f})", file=sys.stderr,
                          flush=True)
    print(f"\n{n_cores} cores ({args.cores}); train img/s, full pipeline, cache off, batch 16, resnet18\n")
    print("| size | stacks | workers | " + " | ".join(f"threads={t}" for t in range(1, n_cores + 1))
          + " | default |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in range(n_cores + 1)) + " |")
    for size in sizes:
        for compress in compressions:
            for workers in (0, 1, 2):
                cells = [r for r in rows if r[:3] == (size, compress, workers)]
                vals = " | ".join(f"{r[4]:.1f}" for r in cells)
                print(f"| {size} | {'zlib' if compress else 'plain'} | {workers} | {vals} |")
    default_w = 0
    for size in sizes:
        d = next(r for r in rows if r[0] == size and not r[1] and r[2] == default_w and r[3] is None)
        full = next(r for r in rows if r[0] == size and not r[1] and r[2] == default_w and r[3] == n_cores)
        print(f"default_vs_num_threads_{n_cores}[{size}px,workers={default_w}]={d[4] / full[4]:.3f} "
              f"({d[4]:.1f} vs {full[4]:.1f} img/s)")


if __name__ == "__main__":
    main()
