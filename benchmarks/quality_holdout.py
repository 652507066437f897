#!/usr/bin/env python
"""Quality on data the tests never see: the independent generator in holdout_experiment.py, trained with
the defaults (resnet18, image_size 96, 12 epochs), for several seeds.

    python benchmarks/quality_holdout.py [--seeds 0 1 2] [--out /tmp/cellmtl_holdout] [--set key=value ...]

Prints one line per seed and, last, the mean of val cls_auc and reg_mae (hours) at the best epoch,
with the error of always predicting the training mean time for comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent


def mean_baseline(manifest: Path) -> float:
    """MAE (h) of predicting the training split's mean time target for every val frame."""
    rows = list(csv.DictReader(manifest.open()))
    targets: dict[str, list[float]] = {"train": [], "val": []}
    for r in rows:
        start, dt = float(r["start_hour"] or 0), float(r["frame_interval_hours"] or 1)
        onset = float(r["infection_onset_hour"]) if r["condition"] == "infected" else None
        for i in range(20):
            h = start + i * dt
            if onset is not None and h < onset:
                continue
            targets[r["split"]].append(h - onset if onset is not None else h)
    mean = float(np.mean(targets["train"]))
    return float(np.mean(np.abs(np.array(targets["val"]) - mean)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("/tmp/cellmtl_holdout"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    aucs, maes = [], []
    for seed in args.seeds:
        data = args.out / f"data_seed{seed}"
        subprocess.run(
            [sys.executable, str(HERE / "holdout_experiment.py"), "--out", str(data), "--seed", str(seed)],
            check=True,
            capture_output=True,
        )
        cfg = {
            "experiment_name": f"holdout_seed{seed}",
            "output_dir": str(args.out / "runs"),
            "seed": seed,
            "data": {"manifest": str(data / "manifest.csv"), "image_size": 96},
            "model": {"name": "resnet18"},
            "training": {"epochs": 12, "progress": False},
        }
        cfg_path = args.out / f"config_seed{seed}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        cmd = [sys.executable, "-m", "cellmtl", "train", "--config", str(cfg_path)]
        for o in args.overrides:
            cmd += ["--set", o]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        run = Path(proc.stdout.strip().splitlines()[-1])
        res = json.loads((run / "results.json").read_text())
        best = res["best"]
        aucs.append(best["cls_auc"])
        maes.append(best["reg_mae"])
        print(
            f"seed {seed}: best epoch {res['best_epoch']} cls_auc={best['cls_auc']:.4f} "
            f"reg_mae={best['reg_mae']:.2f} h (infected {best['reg_mae_infected']:.2f}, "
            f"uninfected {best['reg_mae_uninfected']:.2f}) mean-baseline={mean_baseline(data / 'manifest.csv'):.2f} h "
            f"wall {res['wall_time_s']:.0f} s  {run}",
            flush=True,
        )
    print(f"mean over {len(args.seeds)} seeds: cls_auc={np.mean(aucs):.4f} reg_mae={np.mean(maes):.2f} h")


if __name__ == "__main__":
    main()
