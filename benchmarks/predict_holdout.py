#!/usr/bin/env python
"""Issue 4's acceptance, as a new user would check it: train with the defaults on an experiment the tests never
see (holdout_experiment.py: 12 stacks by default, 4 marked val), then `cellmtl predict` on the 4 val stacks as new
stacks and compare each stack's predicted condition and `est_onset_hour` with the truth.

    python benchmarks/predict_holdout.py [--seed 0] [--out /tmp/cellmtl_predict_holdout] [--checkpoint last|best]
        [--run RUN_DIR] [--stacks 12] [--course synchronous|spread|cascade] [--set key=value ...]

Acceptance: every stack's condition right, and every infected stack's onset within 2 h. `slope` is the stack's
`onset_fit_slope` (near 1 when the predicted times track the clock, so that the onset estimate means something).
`--checkpoint last` (default) uses weights the val stacks never influenced; `best` was selected on them (a mild
leak). `--run` reuses a run trained on the same `--seed`, `--stacks` and `--course` instead of training again;
the script stops if that run trained on a held-out stack (stack i renders the same at any `--stacks`, but which
pairs are val does not, so a 36-stack run trained on some of the 12-stack experiment's val stacks). Exit status 0
whether or not the acceptance holds; the last line says.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

from holdout_common import make_data, train_run
from holdout_experiment import COURSES

from cellmtl.compare import read_splits

ONSET_TOLERANCE_H = 2.0


def held_out_manifest(manifest: Path) -> tuple[Path, dict[str, dict]]:
    """The val rows only, written beside the original (paths stay relative to it); truth keyed by stack_id."""
    rows = [r for r in csv.DictReader(manifest.open()) if r["split"] == "val"]
    out = manifest.with_name("manifest_heldout.csv")
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out, {r["stack_id"]: r for r in rows}


def judge(stacks_csv: Path, truth: dict[str, dict]) -> bool:
    """Print one line per held-out stack; True when every condition is right and every infected onset is
    within ONSET_TOLERANCE_H."""
    ok_all = True
    print(f"{'stack':<10} {'true':<11} {'pred':<11} {'p_inf':>6} {'frac':>5} {'onset':>6} {'est':>6} {'err_h':>6} "
          f"{'slope':>6}  ok")
    for row in csv.DictReader(stacks_csv.open()):
        t = truth[row["stack_id"]]
        cond_ok = row["pred_condition"] == t["condition"]
        onset, est, err = "", row["est_onset_hour"], ""
        onset_ok = True
        if t["condition"] == "infected":
            onset = t["infection_onset_hour"]
            if est == "":
                onset_ok = False
            else:
                err = f"{float(est) - float(onset):+.2f}"
                onset_ok = abs(float(est) - float(onset)) <= ONSET_TOLERANCE_H
        ok = cond_ok and onset_ok
        ok_all &= ok
        print(f"{row['stack_id']:<10} {t['condition']:<11} {row['pred_condition']:<11} "
              f"{float(row['prob_infected']):>6.3f} {row.get('frac_frames_infected', ''):>5} {onset:>6} {est:>6} "
              f"{err:>6} {row.get('onset_fit_slope', ''):>6}  "
              f"{'yes' if ok else 'NO'}")
    return ok_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/cellmtl_predict_holdout"))
    ap.add_argument("--checkpoint", choices=("last", "best"), default="last")
    ap.add_argument("--run", type=Path, help="a run trained on this seed's data already (skips training)")
    ap.add_argument("--stacks", type=int, default=12, help="stacks in the experiment (4 of them val)")
    ap.add_argument("--course", choices=COURSES, default="synchronous",
                    help="the generator's infection course (holdout_experiment.py --course)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    data_manifest = make_data(args.out, args.seed, args.stacks, args.course)
    name = f"predict_holdout_{args.course}_{args.stacks}stacks_seed{args.seed}"
    run = args.run or train_run(data_manifest, args.out, name, args.seed, args.overrides)
    manifest, truth = held_out_manifest(data_manifest)
    leaked = sorted(s for s, split in read_splits(run).items() if split == "train" and s in truth)
    if leaked:
        sys.exit(f"error: {run} trained on held-out stacks {', '.join(leaked)}: pass the --stacks and --course it was "
                 "trained with")
    pred = args.out / f"pred_{args.course}_{args.stacks}stacks_seed{args.seed}_{args.checkpoint}.csv"
    subprocess.run(
        [sys.executable, "-m", "cellmtl", "predict", "--checkpoint", str(run / "checkpoints" / f"{args.checkpoint}.pt"),
         "--manifest", str(manifest), "--out", str(pred)],
        check=True,
        capture_output=True,
    )
    print(f"run {run}, checkpoint {args.checkpoint}, predictions {pred}")
    ok = judge(pred.with_name(f"{pred.stem}.stacks.csv"), truth)
    print(f"acceptance (every condition right, every onset within {ONSET_TOLERANCE_H:g} h): {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
