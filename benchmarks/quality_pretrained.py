#!/usr/bin/env python
"""Few wells: scratch vs ImageNet MobileNetV2 (finetune, probe, lp_ft), with and without temporal context, on the
hold-out generator (holdout_experiment.py), at 224 px.

    python benchmarks/quality_pretrained.py [--stacks 12 24] [--seeds 0 1 2] [--variants NAME ...]
        [--out /tmp/cellmtl_pretrained] [--course synchronous|spread|cascade] [--weights .weights/...pt]
        [--set key=value ...]

Needs the offline fixture (`make weights`). Every run is a plain `cellmtl train` with `--set` overrides (printed
with `--list`); finished runs are kept in OUT/results.jsonl and not trained again, so the script can be stopped
and restarted. Prints per run the val metrics at best.pt (cls_auc, reg_mae with its infected / uninfected parts,
the mean within-stack slopes) and the wall time, then per experiment size a table of mean ± std over seeds,
with the hand-made-feature oracle (holdout_oracle.py) and the mean predictor beside them. `--set` adds overrides to
every variant (after its own) and names the variants with them, e.g. `probe [data.image_size=320]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from holdout_common import make_data, mean_baseline, train_run
from holdout_experiment import COURSES
from holdout_oracle import oracle_mae, table

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = "data.temporal_context_hours=[-6,-3,0]"
COMMON = ["data.image_size=224", "data.cache=memory", "data.num_workers=0", "training.epochs=12"]
PRETRAINED = ["model.name=mobilenet_v2", "multitask.time_head=per_class"]  # + model.weights=<fixture>
# name -> (uses the ImageNet fixture, overrides after COMMON)
VARIANTS: dict[str, tuple[bool, list[str]]] = {
    "scratch": (False, []),  # today's defaults: resnet18 from random weights
    "scratch+ctx": (False, [CONTEXT]),
    "finetune": (True, ["optimizer.backbone_lr_scale=0.3"]),  # backbone 3e-4, heads 1e-3 as in the issue
    "finetune+ctx": (True, ["optimizer.backbone_lr_scale=0.3", CONTEXT]),
    "probe": (True, ["training.strategy=probe"]),
    "probe+ctx": (True, ["training.strategy=probe", CONTEXT]),
    "lp_ft": (True, ["training.strategy=lp_ft"]),
    "lp_ft+ctx": (True, ["training.strategy=lp_ft", CONTEXT]),
    # the mock-well time head, measured with the probe (cheap): one shared output, and a random-weights control
    "probe shared": (True, ["training.strategy=probe", "multitask.time_head=shared"]),
    "probe random weights": (False, ["model.name=mobilenet_v2", "multitask.time_head=per_class",
                                     "training.strategy=probe"]),
}
MAIN = ["scratch", "scratch+ctx", "finetune", "finetune+ctx", "probe", "probe+ctx", "lp_ft", "lp_ft+ctx"]
METRICS = ("cls_auc", "reg_mae", "reg_mae_infected", "reg_mae_uninfected", "reg_slope_infected",
           "reg_slope_uninfected")


def overrides(variant: str, weights: Path, extra_sets: list[str] = ()) -> list[str]:
    pretrained, extra = VARIANTS[variant]
    return COMMON + (PRETRAINED + [f"model.weights={weights}"] if pretrained else []) + extra + list(extra_sets)


def label(variant: str, extra_sets: list[str]) -> str:
    return f"{variant} [{' '.join(extra_sets)}]" if extra_sets else variant


def run_one(args: argparse.Namespace, stacks: int, seed: int, variant: str) -> dict:
    manifest = make_data(args.out, seed, stacks, args.course)
    tag = "".join(ch if ch.isalnum() else "_" for ch in label(variant, args.overrides))
    name = f"{args.course}_{stacks}_seed{seed}_{tag}"
    t0 = time.perf_counter()
    run = train_run(manifest, args.out, name, seed, overrides(variant, args.weights, args.overrides))
    res = json.loads((run / "results.json").read_text())
    row = {"stacks": stacks, "seed": seed, "variant": label(variant, args.overrides), "course": args.course,
           "run": str(run),
           "best_epoch": res["best_epoch"], "wall_time_s": res["wall_time_s"],
           "process_s": round(time.perf_counter() - t0, 1), **{k: res["best"].get(k) for k in METRICS}}
    return row


def fmt(values: list[float], digits: int = 2) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "–"
    return f"{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}" if len(v) > 1 else f"{v[0]:.{digits}f}"


def summary(rows: list[dict], baselines: dict[tuple[int, int], dict], stacks: int, variants: list[str]) -> str:
    seeds = sorted({r["seed"] for r in rows if r["stacks"] == stacks})
    lines = [f"### {stacks} stacks ({stacks - 4} training, 4 val), seeds {seeds}", "",
             "| variant | cls_auc | reg_mae (h) | infected / uninfected MAE (h) | slope infected / uninfected | "
             "per seed reg_mae (h) | wall time (s) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        sel = sorted((r for r in rows if r["stacks"] == stacks and r["variant"] == v), key=lambda r: r["seed"])
        if not sel:
            continue
        col = {k: [r[k] for r in sel] for k in (*METRICS, "wall_time_s")}
        by_seed = {r["seed"]: r["reg_mae"] for r in sel}
        per_seed = " / ".join(f"{by_seed[k]:.2f}" if k in by_seed else "–" for k in seeds)
        lines.append(f"| {v} | {fmt(col['cls_auc'], 3)} | {fmt(col['reg_mae'])} | {fmt(col['reg_mae_infected'])} / "
                     f"{fmt(col['reg_mae_uninfected'])} | {fmt(col['reg_slope_infected'])} / "
                     f"{fmt(col['reg_slope_uninfected'])} | {per_seed} | "
                     f"{fmt(col['wall_time_s'], 0)} |")
    base = [b for (n, _), b in sorted(baselines.items()) if n == stacks]
    if base:
        per_seed = {k: " / ".join(f"{b[k]:.2f}" for b in base) for k in ("oracle", "mean")}
        lines.append(f"| feature oracle (ridge per class) | – | {fmt([b['oracle'] for b in base])} | "
                     f"{fmt([b['oracle_infected'] for b in base])} / {fmt([b['oracle_uninfected'] for b in base])} | – "
                     f"| {per_seed['oracle']} | – |")
        lines.append(f"| mean predictor | – | {fmt([b['mean'] for b in base])} | – | 0 / 0 | {per_seed['mean']} | – |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stacks", type=int, nargs="+", default=[12, 24])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=MAIN, choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("/tmp/cellmtl_pretrained"))
    ap.add_argument("--course", choices=COURSES, default="synchronous")
    ap.add_argument("--weights", type=Path, default=ROOT / ".weights" / "mobilenet_v2_imagenet.pt")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="added to every variant (and to its name)")
    ap.add_argument("--list", action="store_true", help="print each variant's --set overrides and stop")
    args = ap.parse_args()
    if args.list:
        for v in args.variants:
            print(f"{label(v, args.overrides)}: " + " ".join(f"--set {o}" for o in overrides(v, args.weights,
                                                                                           args.overrides)))
        return
    if not args.weights.is_file():
        sys.exit(f"error: {args.weights} is missing: run `make weights`")
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "results.jsonl"
    rows = [json.loads(line) for line in store.read_text().splitlines()] if store.is_file() else []
    done = {(r["stacks"], r["seed"], r["variant"], r["course"]) for r in rows}
    baselines: dict[tuple[int, int], dict] = {}
    for stacks in args.stacks:
        for seed in args.seeds:
            manifest = make_data(args.out, seed, stacks, args.course)
            mae, inf, uninf = oracle_mae(table(manifest))
            baselines[(stacks, seed)] = {"oracle": mae, "oracle_infected": inf, "oracle_uninfected": uninf,
                                         "mean": mean_baseline(manifest)}
            for variant in args.variants:
                if (stacks, seed, label(variant, args.overrides), args.course) in done:
                    continue
                row = run_one(args, stacks, seed, variant)
                rows.append(row)
                with store.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{stacks} stacks seed {seed} {variant}: cls_auc {row['cls_auc']:.3f} reg_mae "
                      f"{row['reg_mae']:.2f} h (infected {row['reg_mae_infected']:.2f}, uninfected "
                      f"{row['reg_mae_uninfected']:.2f}) slopes {row['reg_slope_infected']:.2f} / "
                      f"{row['reg_slope_uninfected']:.2f} wall {row['wall_time_s']:.0f} s  {row['run']}", flush=True)
    rows = [r for r in rows if r["course"] == args.course]
    for stacks in args.stacks:
        print()
        print(summary(rows, baselines, stacks, [label(v, args.overrides) for v in args.variants]))


if __name__ == "__main__":
    main()
