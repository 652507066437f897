"""`cellmtl compare`: is multi-task learning worth it on *this* data? And which training strategy?

Trains `multitask`, `classification`-only and `regression`-only models with each seed on one identical
split (the first run's, passed to the others as explicit `data.*_stacks` and checked in every
`splits.csv`); with `--strategies`, the config's task with each `training.strategy` instead (`scratch` = the same
network from random weights), so a user sees scratch vs probe vs fine-tune on their own wells; and a `classical`
baseline (hand-crafted per-channel intensity and texture features + a
scikit-learn random forest classifier and regressor) on the same frames, so users see what deep learning
buys. Writes into the folder it prints last: `comparison.csv` (one row per mode and seed, every metric),
`comparison.md` (mean ± std per mode, best marked, paired tests across seeds) and `comparison.png`.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from cellmtl.config import CLS_METRICS, REG_METRICS, Config, config_from_dict, config_to_dict
from cellmtl.errors import BadInputError, TrainingError
from cellmtl.fileio import write_csv, write_text
from cellmtl.metrics import LOWER_IS_BETTER, SLOPE_METRICS
from cellmtl.runtime import Countdown

MODES = ("multitask", "classification", "regression")
STRATEGIES = ("scratch", "finetune", "probe", "lp_ft")  # scratch: finetune from random weights
CLASSICAL = "classical"
# The columns of comparison.md (validation, at each run's best epoch); comparison.csv has every metric.
TABLE_METRICS = ("cls_auc", "cls_acc", "cls_f1", "reg_mae", "reg_mae_infected", "reg_mae_uninfected")
MD_COLUMNS = TABLE_METRICS + SLOPE_METRICS  # comparison.md; the slopes are shown, never bolded


def mode_config(cfg: Config, mode: str, seed: int, runs_dir: Path, splits: dict[str, str] | None) -> Config:
    """`cfg` as a single run of `mode` with `seed`; `splits` (stack_id -> split) pins the stacks.

    Options that only make sense with both heads fall back to their defaults for single-task modes, and a
    selection metric of the missing head falls back to the mode's default."""
    raw = config_to_dict(cfg)
    raw["seed"] = seed
    raw["output_dir"] = str(runs_dir)
    raw["experiment_name"] = f"{mode}_seed{seed}"
    raw["task"]["mode"] = mode
    if mode != "multitask":
        raw["multitask"].update(weighting="fixed", time_head="shared")
        metric = raw["training"]["select_metric"]
        wrong = CLS_METRICS if mode == "regression" else REG_METRICS
        if metric in wrong:
            raw["training"]["select_metric"] = None
    if splits is not None:
        for split in ("train", "val", "test"):
            raw["data"][f"{split}_stacks"] = sorted(s for s, sp in splits.items() if sp == split)
    return config_from_dict(raw, f"compare ({mode}, seed {seed})")


def strategy_config(cfg: Config, strategy: str, seed: int, runs_dir: Path, splits: dict[str, str] | None) -> Config:
    """`cfg` as a single run with `training.strategy` `strategy` (`scratch`: finetune with model.weights and
    model.pretrained off) and `seed`; `splits` pins the stacks. Heads take the strategy's default size unless the
    config sets one that fits it."""
    raw = config_to_dict(cfg)
    raw.update(seed=seed, output_dir=str(runs_dir), experiment_name=f"{strategy}_seed{seed}")
    raw["training"]["strategy"] = "finetune" if strategy == "scratch" else strategy
    if strategy == "scratch":
        raw["model"].update(weights=None, pretrained=False)
    if raw["training"]["strategy"] != cfg.training.strategy:
        raw["model"]["head_hidden"] = None  # finetune's default MLP heads, probe/lp_ft's linear ones
    if splits is not None:
        for split in ("train", "val", "test"):
            raw["data"][f"{split}_stacks"] = sorted(s for s, sp in splits.items() if sp == split)
    return config_from_dict(raw, f"compare ({strategy}, seed {seed})")


def read_splits(run: Path) -> dict[str, str]:
    with (run / "splits.csv").open() as fh:
        return {r["stack_id"]: r["split"] for r in csv.DictReader(fh)}


def result_row(mode: str, seed: int, run: Path | None, results: dict[str, Any]) -> dict[str, Any]:
    """One comparison.csv row: val metrics at the best epoch (`val_*`), and `test_*` where a test split
    exists."""
    row: dict[str, Any] = {"mode": mode, "kind": "classical" if mode == CLASSICAL else "deep", "seed": seed,
                           "run_dir": "" if run is None else str(run)}
    for split, key in (("val", "best"), ("test", "test")):
        for k, v in (results.get(key) or {}).items():
            row[f"{split}_{k}"] = v
    row["wall_time_s"] = results.get("wall_time_s", "")
    return row


def compare(cfg: Config, seeds: int = 1, *, out_dir: Path | None = None,
            strategies: Sequence[str] | None = None) -> Path:
    """Train every mode (or every strategy of `strategies`, on the config's task) with seeds `cfg.seed ..
    cfg.seed + seeds - 1`; returns the comparison folder."""
    from cellmtl.training.run import train

    if seeds < 1:
        raise BadInputError(f"--seeds must be at least 1, got {seeds}")
    if strategies is not None:
        unknown = [a for a in strategies if a not in STRATEGIES]
        if unknown or not strategies or len(set(strategies)) != len(strategies):
            raise BadInputError(f"--strategies {' '.join(strategies)}: give distinct names from "
                                f"{', '.join(STRATEGIES)}")
    arms = list(strategies) if strategies else list(MODES)
    folder = out_dir or Path(cfg.output_dir) / cfg.experiment_name / f"compare-{datetime.now():%Y%m%d-%H%M%S-%f}"
    folder.mkdir(parents=True, exist_ok=True)
    runs_dir = folder / "runs"
    rows: list[dict[str, Any]] = []
    splits: dict[str, str] | None = None
    countdown = Countdown("compare", seeds * len(arms))
    for k in range(seeds):
        seed = cfg.seed + k
        first_run: Path | None = None
        for arm in arms:
            arm_cfg = (strategy_config if strategies else mode_config)(cfg, arm, seed, runs_dir, splits)
            run = train(arm_cfg)
            used = read_splits(run)
            if splits is None:
                splits = used
            elif used != splits:  # would make the comparison meaningless: never silently
                raise TrainingError(f"compare: run {run} used a different split than the first run")
            first_run = first_run or run
            rows.append(result_row(arm, seed, run, json.loads((run / "results.json").read_text())))
            countdown.step(f"{arm} seed {seed}: {run}")
        assert first_run is not None
        rows.append(result_row(CLASSICAL, seed, None, classical_results(first_run, seed)))
    write_csv(rows, folder / "comparison.csv")  # columns in first-seen order; None and missing -> ""
    table = markdown_summary(rows, splits or {}, arms=arms)
    write_text(folder / "comparison.md", table)
    plot_comparison(rows, folder / "comparison.png")
    print(table, file=sys.stderr)  # the answer on the terminal, not only in a file
    return folder


# --- the classical baseline -------------------------------------------------------------------------------

def image_features(img: np.ndarray) -> np.ndarray:
    """Per-channel intensity and texture features of a normalised image `[C, H, W]` float32 -> `[C * 8]`:
    mean, std, 10/50/90th percentiles, mean gradient magnitude, mean |Laplacian| and the share of pixels
    brighter than mean + 2 std (spots)."""
    feats = []
    for ch in np.asarray(img, dtype=np.float64):
        gy, gx = np.gradient(ch)
        lap = -4 * ch[1:-1, 1:-1] + ch[:-2, 1:-1] + ch[2:, 1:-1] + ch[1:-1, :-2] + ch[1:-1, 2:]
        m, s = ch.mean(), ch.std()
        p10, p50, p90 = np.percentile(ch, [10, 50, 90])
        feats += [m, s, p10, p50, p90, np.hypot(gx, gy).mean(), np.abs(lap).mean(), (ch > m + 2 * s).mean()]
    return np.asarray(feats, dtype=np.float64)


def dataset_features(ds) -> np.ndarray:
    return np.stack([image_features(ds.load_image(i).numpy()) for i in range(len(ds))])


def classical_results(mt_run: Path, seed: int) -> dict[str, Any]:
    """Random forests on hand-crafted features of the same frames (same split, channels, image size and
    normalisation as the deep run `mt_run`); val (and test) metrics in results.json's layout."""
    import time

    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    from cellmtl.checkpoints import Checkpoint
    from cellmtl.data.dataset import load_experiment
    from cellmtl.metrics import compute_metrics
    from cellmtl.training.state import split_indices

    t0 = time.perf_counter()
    ckpt = Checkpoint.load(mt_run / "checkpoints" / "best.pt")
    run_cfg = ckpt.config
    exp = load_experiment(run_cfg, splits=ckpt.splits, trained=ckpt.trained_channels)
    indices = split_indices(run_cfg, exp)
    ids = [r.stack_id for r in exp.records]
    intervals = [r.frame_interval_hours for r in exp.records]
    feats, index = {}, {}
    for split, idx in indices.items():
        if idx is not None:
            feats[split] = dataset_features(ckpt.dataset(exp.infos, ids, idx, intervals))
            index[split] = idx
    y_cls = index["train"].infected.astype(int)
    y_t = index["train"].time_target
    has_t = np.isfinite(y_t)
    clf = RandomForestClassifier(n_estimators=200, min_samples_leaf=2, random_state=seed, n_jobs=1)
    clf.fit(feats["train"], y_cls)
    reg = RandomForestRegressor(n_estimators=200, min_samples_leaf=2, random_state=seed, n_jobs=1)
    reg.fit(feats["train"][has_t], y_t[has_t])
    out: dict[str, Any] = {}
    for split, key in (("val", "best"), ("test", "test")):
        if split not in feats:
            continue
        idx = index[split]
        prob = clf.predict_proba(feats[split])[:, list(clf.classes_).index(1)] if 1 in clf.classes_ else None
        out[key] = compute_metrics(
            infected=idx.infected.astype(np.int64),
            prob=prob,
            time_true=idx.time_target,
            time_pred=reg.predict(feats[split]),
            time_mask=np.isfinite(idx.time_target),
            stack=idx.stack,  # within-stack slopes, as the deep runs' results.json
        )
    out["wall_time_s"] = round(time.perf_counter() - t0, 2)
    return out


# --- the summary ------------------------------------------------------------------------------------------

def _values(rows: Sequence[dict[str, Any]], mode: str, metric: str) -> list[float]:
    vals = [r.get(f"val_{metric}") for r in rows if r["mode"] == mode]
    return [float(v) for v in vals if v is not None and v != "" and math.isfinite(float(v))]


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any] | None:
    """Paired comparison of two modes over seeds: mean difference a - b, the paired t-test's two-sided p
    (scipy, present with scikit-learn) and the sign count. None with fewer than 2 pairs."""
    if len(a) != len(b) or len(a) < 2:
        return None
    d = np.asarray(a) - np.asarray(b)
    p = None
    if np.std(d) > 0:
        from scipy import stats

        p = float(stats.ttest_rel(a, b).pvalue)
    return {"mean_diff": float(d.mean()), "p": p, "a_wins": int((d > 0).sum()), "b_wins": int((d < 0).sum()),
            "n": len(d)}


def paired_pairs(arms: Sequence[str]) -> list[tuple[str, str, str]]:
    """(metric, a, b) rows of the paired-test table: multitask against each single-task mode and the classical
    baseline; for strategies, every strategy against the first one listed, and the first against classical."""
    if list(arms) == list(MODES):
        return [("cls_auc", "multitask", "classification"), ("cls_acc", "multitask", "classification"),
                ("reg_mae", "multitask", "regression"), ("reg_mae_infected", "multitask", "regression"),
                ("cls_auc", "multitask", CLASSICAL), ("reg_mae", "multitask", CLASSICAL)]
    ref = arms[0]
    out = [(m, a, ref) for a in arms[1:] for m in ("cls_auc", "reg_mae", "reg_mae_infected", "reg_mae_uninfected")]
    return out + [("cls_auc", ref, CLASSICAL), ("reg_mae", ref, CLASSICAL)]


def markdown_summary(rows: Sequence[dict[str, Any]], splits: dict[str, str], arms: Sequence[str] = MODES) -> str:
    modes = [m for m in (*arms, CLASSICAL) if any(r["mode"] == m for r in rows)]
    n_seeds = len({r["seed"] for r in rows})
    counts = {sp: sum(1 for v in splits.values() if v == sp) for sp in ("train", "val", "test")}
    by_strategy = list(arms) != list(MODES)
    lines = [
        "# Training strategies compared" if by_strategy else "# Multi-task vs single-task comparison",
        "",
        f"{n_seeds} seed(s); one split for every run ({', '.join(f'{k} {v}' for k, v in counts.items())} stacks, "
        "identical in every run's splits.csv). Validation metrics at each run's best epoch; mean ± std over "
        "seeds; **bold** = best mode per column (MAE in hours, lower is better). `classical` = hand-crafted "
        "per-channel intensity/texture features + scikit-learn random forests (not deep learning). "
        "`reg_slope_*`: slope of predicted on true time inside each val stack, mean over stacks (1: the time "
        "output reads the clock in wells it never saw; 0: one value per well, whatever its reg_mae); not bolded.",
        "",
        "| mode | " + " | ".join(MD_COLUMNS) + " |",
        "| --- | " + " | ".join("---" for _ in MD_COLUMNS) + " |",
    ]
    best: dict[str, str] = {}
    for metric in TABLE_METRICS:
        means = {m: float(np.mean(v)) for m in modes if (v := _values(rows, m, metric))}
        if means:
            pick = min if metric in LOWER_IS_BETTER else max
            best[metric] = pick(means, key=means.__getitem__)
    for m in modes:
        cells = []
        for metric in MD_COLUMNS:
            v = _values(rows, m, metric)
            if not v:
                cells.append("–")
                continue
            text = f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
            cells.append(f"**{text}**" if best.get(metric) == m else text)
        label = "classical (features + random forests)" if m == CLASSICAL else m
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    title = f"each strategy minus {arms[0]}" if by_strategy else "multitask minus single-task"
    lines += ["", f"## Paired tests across seeds ({title})", ""]
    if n_seeds < 2:
        lines.append("One seed: no paired test (run with `--seeds 3` or more).")
    else:
        head = "| metric | strategy | vs | mean difference | paired t p | strategy better / worse |" if by_strategy \
            else "| metric | vs | mean difference | paired t p | multitask better / worse |"
        lines += [head, "| --- " * (head.count("|") - 1) + "|"]
        for metric, a, other in paired_pairs(arms):
            t = paired_test(_values(rows, a, metric), _values(rows, other, metric))
            if t is None:
                continue
            better, worse = (t["b_wins"], t["a_wins"]) if metric in LOWER_IS_BETTER else (t["a_wins"], t["b_wins"])
            p = "n/a (no variation)" if t["p"] is None else f"{t['p']:.3g}"
            who = f"| {metric} | {a} | {other} |" if by_strategy else f"| {metric} | {other} |"
            lines.append(f"{who} {t['mean_diff']:+.3f} | {p} | {better} / {worse} of {t['n']} |")
        lines += ["", "With few seeds a paired test has little power: p > 0.05 means *no evidence*, "
                  "not *no difference*."]
    return "\n".join(lines) + "\n"


def plot_comparison(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Two panels, val cls_auc and reg_mae per mode: mean bars, one dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    modes = list(dict.fromkeys(r["mode"] for r in rows if r["mode"] != CLASSICAL))
    modes += [CLASSICAL] if any(r["mode"] == CLASSICAL for r in rows) else []
    fig = Figure(figsize=(10, 4), layout="constrained")
    for ax, metric, label in zip(fig.subplots(1, 2), ("cls_auc", "reg_mae"), ("val AUC (higher is better)",
                                                                            "val time MAE, h (lower is better)"),
                                 strict=True):
        for x, m in enumerate(modes):
            v = _values(rows, m, metric)
            if not v:
                continue
            ax.bar(x, np.mean(v), color="0.8" if m == CLASSICAL else "C0", alpha=0.7)
            ax.plot([x] * len(v), v, "o", color="k", markersize=4)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
    return path
