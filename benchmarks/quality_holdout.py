#!/usr/bin/env python
"""Quality on data the tests never see: the independent generator in holdout_experiment.py, trained with
the defaults (resnet18, image_size 96, 12 epochs), for several seeds.

    python benchmarks/quality_holdout.py [--seeds 0 1 2] [--out /tmp/cellmtl_holdout] [--stacks 12]
        [--course synchronous|spread|cascade] [--set key=value ...]

Prints one line per seed and, last, the mean of val cls_auc and reg_mae (hours) at the best epoch,
with the error of always predicting the training mean time for comparison, and the mean slope of predicted
against true time inside the val stacks of each condition (1: the time head tracks the clock; 0: it gives one
value per stack). `--stacks 36` renders a larger experiment (still 4 val stacks), to see whether more training
wells help.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from holdout_common import make_data, mean_baseline, train_run
from holdout_experiment import COURSES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("/tmp/cellmtl_holdout"))
    ap.add_argument("--stacks", type=int, default=12, help="stacks in the experiment (4 of them val)")
    ap.add_argument("--course", choices=COURSES, default="synchronous",
                    help="the generator's infection course (holdout_experiment.py --course)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    aucs, maes = [], []
    for seed in args.seeds:
        manifest = make_data(args.out, seed, args.stacks, args.course)
        run = train_run(manifest, args.out, f"holdout_{args.course}_seed{seed}", seed, args.overrides)
        res = json.loads((run / "results.json").read_text())
        best = res["best"]
        aucs.append(best["cls_auc"])
        maes.append(best["reg_mae"])
        slope_txt = " ".join(f"{c} {best[f'reg_slope_{c}']:.2f}" for c in ("infected", "uninfected")
                             if best.get(f"reg_slope_{c}") is not None)
        print(
            f"seed {seed}: best epoch {res['best_epoch']} cls_auc={best['cls_auc']:.4f} "
            f"reg_mae={best['reg_mae']:.2f} h (infected {best['reg_mae_infected']:.2f}, "
            f"uninfected {best['reg_mae_uninfected']:.2f}) mean-baseline={mean_baseline(manifest):.2f} h "
            f"slope in stack ({slope_txt}) wall {res['wall_time_s']:.0f} s  {run}"
            + (f"\n  {res['time_note']}" if res.get("time_note") else ""),
            flush=True,
        )
    print(f"mean over {len(args.seeds)} seeds: cls_auc={np.mean(aucs):.4f} reg_mae={np.mean(maes):.2f} h")


if __name__ == "__main__":
    main()
