"""`cellmtl cv`: grouped, stratified k-fold cross-validation over stacks.

With a few dozen wells one train/val split is noisy; k folds give every stack one turn in validation and
a spread (mean ± std) for every metric. Folds are made of whole groups (a plate, well or donor is never
split) and each fold's validation set holds both classes. A held-out `test` split (config lists, manifest
column or `data.test_fraction`) stays out of every fold and is scored by every fold's model.

Layout: `{output_dir}/{experiment_name}/cv-<K>fold-<hash>/` holds `cv_plan.json` (the folds), one normal run
folder per fold and seed (`fold<k>[-seed<s>]/<run_id>/`), `cv_summary.json`, `cv_summary.md` and
`predictions_oof.csv`. `<hash>` is a hash of the resolved config, folds and seeds, so running the same
command again continues the same cross-validation: only folds without `results.json` are trained.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellmtl.config import Config, config_from_dict, config_to_dict
from cellmtl.data.dataset import load_records
from cellmtl.data.manifest import StackRecord
from cellmtl.data.splits import auto_split, splits_from_lists
from cellmtl.engine import read_prediction_rows
from cellmtl.errors import BadInputError
from cellmtl.fileio import write_csv, write_json, write_text
from cellmtl.metrics import compute_metrics
from cellmtl.runtime import Countdown
from cellmtl.training.run import train

PLAN = "cv_plan.json"
MD_FOLD_KEYS = ("cls_auc", "cls_acc", "cls_f1", "reg_mae", "reg_rmse", "reg_mae_infected", "reg_mae_uninfected",
                "reg_slope_infected", "reg_slope_uninfected")

FoldHook = Callable[[int, int, Path], None]


def fold_assignment(
    records: Sequence[StackRecord], k: int, *, seed: int, need_both_classes: bool = True
) -> dict[str, int]:
    """stack_id -> fold (1..k). Whole groups go to one fold; stratified by condition: groups holding the
    rarer class are dealt first, largest first, each to the fold with the fewest of that class, then the
    rest to the fold with the fewest of the other class (ties: fewest stacks, then lowest fold). The
    group order before sorting is a seeded shuffle. BadInputError when a fold would lack a class."""
    if k < 2:
        raise BadInputError(f"cv --folds must be at least 2, got {k}")
    groups: dict[str, list[StackRecord]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    if len(groups) < k:
        raise BadInputError(
            f"cv: {k} folds need at least {k} groups (stacks of a group stay together), found {len(groups)}"
        )
    n_pos = sum(1 for r in records if r.infected)
    rare = n_pos <= len(records) - n_pos  # True: infected is the rarer class

    def count(g: str, cls: bool) -> int:
        return sum(1 for r in groups[g] if bool(r.infected) == cls)

    order = [str(g) for g in np.random.default_rng(seed).permutation(sorted(groups))]
    first = sorted((g for g in order if count(g, rare)), key=lambda g: -count(g, rare))
    rest = sorted((g for g in order if not count(g, rare)), key=lambda g: -len(groups[g]))
    per_fold = [{True: 0, False: 0} for _ in range(k)]
    out: dict[str, int] = {}
    for cls, batch in ((rare, first), (not rare, rest)):
        for g in batch:
            f = min(range(k), key=lambda i: (per_fold[i][cls], sum(per_fold[i].values()), i))
            per_fold[f][True] += count(g, True)
            per_fold[f][False] += count(g, False)
            out.update({r.stack_id: f + 1 for r in groups[g]})
    for i, c in enumerate(per_fold):
        if need_both_classes and (c[True] == 0 or c[False] == 0):
            n_inf = sum(1 for g in groups if count(g, True))
            n_mock = sum(1 for g in groups if count(g, False))
            raise BadInputError(
                f"cv: {k} folds cannot each hold both classes in validation: {n_inf} group(s) have infected "
                f"and {n_mock} have uninfected stacks (a group is never split); use --folds {min(n_inf, n_mock)} "
                "or fewer"
            )
        if sum(c.values()) == 0:
            raise BadInputError(f"cv: fold {i + 1} of {k} would be empty")
    return out


def cv_pool(cfg: Config, records: Sequence[StackRecord]) -> tuple[list[StackRecord], list[str]]:
    """(stacks to cross-validate, held-out test stack_ids). The config's own precedence decides what is
    `test` (data.*_stacks, then the manifest's split column, then data.test_fraction); every other stack
    the config would use is pooled for the folds (with an explicit train list: train + val lists)."""
    d = cfg.data
    known = {r.stack_id for r in records}
    if d.train_stacks or d.val_stacks or d.test_stacks:
        # the lists' own rules (unknown ids, a stack in two lists, unlisted stacks) as a normal run applies them
        listed = splits_from_lists(records, d.train_stacks, d.val_stacks, d.test_stacks)
        test = {s for s, sp in listed.items() if sp == "test"}
        used = set(listed) - test
    elif any(r.split for r in records):
        test = {r.stack_id for r in records if r.split == "test"}
        used = known - test
    else:
        auto = auto_split(records, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=cfg.seed)
        test = {s for s, sp in auto.items() if sp == "test"}
        used = known - test
    return [r for r in records if r.stack_id in used], [r.stack_id for r in records if r.stack_id in test]


def cv_id(cfg: Config, k: int, seeds: int) -> str:
    """Same resolved config, folds and seeds -> same id, so a re-run continues the same cross-validation."""
    blob = json.dumps({"config": config_to_dict(cfg), "folds": k, "seeds": seeds}, sort_keys=True)
    return f"cv-{k}fold-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def run_name(fold: int, seed_no: int, n_seeds: int) -> str:
    return f"fold{fold}" if n_seeds == 1 else f"fold{fold}-seed{seed_no + 1}"


def fold_config(base: dict[str, Any], plan: dict[str, Any], cv_dir: Path, fold: int, seed_no: int) -> Config:
    """The fold's normal training config: explicit stack lists (val = the fold, train = the other folds,
    test = the held-out stacks), output inside the cv folder, seed = base seed + seed number."""
    raw = json.loads(json.dumps(base))
    assignment: dict[str, int] = plan["assignment"]
    raw["data"].update(
        train_stacks=[s for s, f in assignment.items() if f != fold],
        val_stacks=[s for s, f in assignment.items() if f == fold],
        test_stacks=list(plan["test"]),
    )
    raw["output_dir"] = str(cv_dir)
    raw["experiment_name"] = run_name(fold, seed_no, len(plan["seeds"]))
    raw["seed"] = plan["seeds"][seed_no]
    return config_from_dict(raw, f"cv fold {fold}")


def finished_run(folder: Path) -> Path | None:
    """The newest run in `folder` with results.json (a fold is done when its run has one)."""
    done = sorted(p.parent for p in folder.glob("*/results.json"))
    return done[-1] if done else None


def never_trained(folder: Path) -> list[Path]:
    """Run folders in `folder` killed before their first epoch ended: no checkpoint and no results.json,
    only the config, split list and log of a start. Nothing in them can be resumed or summarised."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not (p / "results.json").exists()
                  and not (p / "checkpoints" / "last.pt").exists() and (p / "config.yaml").exists())


def unfinished_run(folder: Path) -> Path | None:
    """The newest run in `folder` killed after at least one epoch (last.pt, no results.json)."""
    runs = sorted(p.parent.parent for p in folder.glob("*/checkpoints/last.pt"))
    return runs[-1] if runs else None


def make_plan(cfg: Config, k: int, seeds: int) -> dict[str, Any]:
    records = load_records(cfg)
    pool, test = cv_pool(cfg, records)
    assignment = fold_assignment(pool, k, seed=cfg.seed, need_both_classes=cfg.task.mode != "regression")
    return {
        "folds": k,
        "seeds": [cfg.seed + i for i in range(seeds)],
        "assignment": assignment,
        "groups": {r.stack_id: r.group for r in pool},
        "test": test,
        "config": config_to_dict(cfg),
    }


def run_cv(
    cfg: Config | None,
    *,
    folds: int | None = None,
    seeds: int = 1,
    resume: str | Path | None = None,
    on_fold_done: FoldHook | None = None,
) -> Path:
    """Train every fold (and seed) not yet done, then write the summary; returns the cv folder.
    `on_fold_done(fold, seed, run_dir)` is called after each trained fold (tests use it to interrupt)."""
    if seeds < 1:
        raise BadInputError(f"cv --seeds must be at least 1, got {seeds}")
    if resume is not None:
        cv_dir = Path(resume)
        if not (cv_dir / PLAN).is_file():
            raise BadInputError(f"cv --resume {cv_dir}: no {PLAN} there (not a cv folder)")
        plan = json.loads((cv_dir / PLAN).read_text())
        if folds is not None and folds != plan["folds"]:
            raise BadInputError(f"cv --resume {cv_dir}: it has {plan['folds']} folds, not --folds {folds}")
    else:
        if cfg is None or folds is None:
            raise BadInputError("cv needs --config CFG and --folds K (or --resume CV_DIR)")
        cv_dir = Path(cfg.output_dir) / cfg.experiment_name / cv_id(cfg, folds, seeds)
        if (cv_dir / PLAN).is_file():
            plan = json.loads((cv_dir / PLAN).read_text())  # the same cv started before: keep its folds
        else:
            plan = make_plan(cfg, folds, seeds)
            cv_dir.mkdir(parents=True, exist_ok=True)
            write_json(cv_dir / PLAN, plan)
    todo = [(f, k) for f in range(1, plan["folds"] + 1) for k in range(len(plan["seeds"]))
            if finished_run(cv_dir / run_name(f, k, len(plan["seeds"]))) is None]
    countdown = Countdown("cv", len(todo))
    for fold in range(1, plan["folds"] + 1):
        for seed_no in range(len(plan["seeds"])):
            folder = cv_dir / run_name(fold, seed_no, len(plan["seeds"]))
            if finished_run(folder) is not None:
                continue
            partial = unfinished_run(folder)
            if partial is not None:
                run_dir = train(None, resume=partial)
            else:
                for stale in never_trained(folder):  # else the fold would hold two runs, one of them empty
                    shutil.rmtree(stale)
                    print(f"cv: removed {stale} (stopped before its first epoch ended)", file=sys.stderr)
                run_dir = train(fold_config(plan["config"], plan, cv_dir, fold, seed_no))
            countdown.step(f"fold {fold} seed {plan['seeds'][seed_no]}")
            if on_fold_done is not None:
                on_fold_done(fold, plan["seeds"][seed_no], run_dir)
    summary = write_summary(cv_dir, plan)
    print(summary_markdown(summary), file=sys.stderr)  # the answer on the terminal, not only in a file
    return cv_dir


def _mean_std(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean and sample std (ddof=1) over folds where the metric is defined; std is null for one value."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals)}


def _floats(rows: Sequence[dict], column: str) -> np.ndarray:
    return np.array([np.nan if r[column] is None else r[column] for r in rows], dtype=np.float64)


def score_rows(rows: Sequence[dict]) -> dict[str, float | None]:
    """Metrics of prediction rows (SPEC section 6 columns, as `engine.read_prediction_rows` gives them)
    scored as one set."""
    labelled = [r for r in rows if r.get("condition") in ("infected", "uninfected")]
    if not labelled:
        return {}
    infected = np.array([r["condition"] == "infected" for r in labelled], dtype=np.int64)
    has_prob = labelled[0]["prob_infected"] is not None
    has_time = labelled[0]["pred_time_hours"] is not None
    t_true = _floats(labelled, "time_target")
    return compute_metrics(
        infected=infected,
        prob=_floats(labelled, "prob_infected") if has_prob else None,
        time_true=np.nan_to_num(t_true) if has_time else None,
        time_pred=_floats(labelled, "pred_time_hours") if has_time else None,
        time_mask=np.isfinite(t_true) if has_time else None,
        stack=np.array([r["stack_id"] for r in labelled]),
    )


def write_summary(cv_dir: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """cv_summary.json/.md and predictions_oof.csv from the finished fold runs."""
    n_seeds = len(plan["seeds"])
    fold_rows, oof = [], []
    for fold in range(1, plan["folds"] + 1):
        for seed_no, seed in enumerate(plan["seeds"]):
            run = finished_run(cv_dir / run_name(fold, seed_no, n_seeds))
            if run is None:
                continue
            res = json.loads((run / "results.json").read_text())
            row = {"fold": fold, "seed": seed, "run_dir": str(run), "best_epoch": res["best_epoch"],
                   "n_val_stacks": sum(1 for f in plan["assignment"].values() if f == fold),
                   "val": res["best"], "test": res.get("test")}
            fold_rows.append(row)
            oof += [{"fold": fold, "seed": seed, **r} for r in read_prediction_rows(run / "predictions_val.csv")]
    keys = list(dict.fromkeys(k for r in fold_rows for k in r["val"]))
    summary: dict[str, Any] = {
        "cv_dir": str(cv_dir),
        "folds": plan["folds"],
        "seeds": plan["seeds"],
        "runs_done": len(fold_rows),
        "runs_planned": plan["folds"] * n_seeds,
        "std": "sample std (ddof=1) over fold runs",
        "val": {k: _mean_std([r["val"].get(k) for r in fold_rows]) for k in keys},
        "oof_pooled": score_rows(oof),
        "oof_frames": len(oof),
        "per_fold": fold_rows,
        "test_stacks": plan["test"],
    }
    if any(r["test"] for r in fold_rows):
        tkeys = list(dict.fromkeys(k for r in fold_rows for k in (r["test"] or {})))
        summary["test"] = {k: _mean_std([(r["test"] or {}).get(k) for r in fold_rows]) for k in tkeys}
    write_csv(oof, cv_dir / "predictions_oof.csv")
    write_json(cv_dir / "cv_summary.json", summary)
    write_text(cv_dir / "cv_summary.md", summary_markdown(summary))
    return summary


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def summary_markdown(s: dict[str, Any]) -> str:
    lines = [f"# Cross-validation: {s['folds']} folds x {len(s['seeds'])} seed(s)", "",
             f"{s['runs_done']} of {s['runs_planned']} runs done; validation metrics at each run's best epoch, "
             f"mean ± {s['std']}.", ""]
    for split in ("val", "test"):
        if split not in s:
            continue
        lines += [f"## {split}" + (" (held-out stacks, every fold's model)" if split == "test" else ""), "",
                  "| metric | mean ± std | folds |", "| --- | --- | --- |"]
        for k, v in s[split].items():
            lines.append(f"| {k} | {_fmt(v['mean'])} ± {_fmt(v['std'])} | {v['n']} |")
        lines.append("")
    keys = [k for k in MD_FOLD_KEYS if k in s["val"]]
    lines += ["## Per fold", "", "| fold | seed | val stacks | best epoch | " + " | ".join(keys) + " | run |",
              "| --- " * (len(keys) + 5) + "|"]
    for r in s["per_fold"]:
        lines.append(f"| {r['fold']} | {r['seed']} | {r['n_val_stacks']} | {r['best_epoch']} | "
                     + " | ".join(_fmt(r["val"].get(k)) for k in keys) + f" | {Path(r['run_dir']).name} |")
    lines += ["", f"## Pooled out-of-fold predictions ({s['oof_frames']} frames, predictions_oof.csv)", "",
              "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in s["oof_pooled"].items()]
    return "\n".join(lines) + "\n"
