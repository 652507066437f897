"""Time-resolved and per-stack evaluation: "how early can infection be seen?", with honest uncertainty.

Frames of one stack are not independent samples, so confidence intervals come from a bootstrap over
stacks (resample whole stacks with replacement), not over frames. Pure functions of arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cellmtl.metrics import compute_metrics

# Keyword arguments of `compute_metrics` (`inference.prediction_arrays` builds them): infected, prob,
# time_true, time_pred, time_mask, each [N] aligned with the frames, or None for a task the model lacks.
Arrays = Mapping[str, np.ndarray | None]

BIN_KEYS = ("cls_auc", "cls_acc", "reg_mae", "reg_mae_infected", "reg_mae_uninfected")


def _subset(arr: np.ndarray | None, sel: np.ndarray) -> np.ndarray | None:
    return None if arr is None else np.asarray(arr)[sel]


def _metrics_on(arrays: Arrays, sel: np.ndarray) -> dict[str, float | None]:
    """`compute_metrics` on the frames `sel` (a boolean mask or an index array)."""
    return compute_metrics(**{k: _subset(v, sel) for k, v in arrays.items()})


def binned_metrics(
    hours: np.ndarray,
    arrays: Arrays,
    bin_hours: float = 3.0,
) -> list[dict[str, float | None]]:
    """Metrics per bin of `hours` (hours since experiment start), bins `[k*bin, (k+1)*bin)`; each row has
    `hour_start`, `hour_end`, `n` and BIN_KEYS present for the model's tasks."""
    hours = np.asarray(hours, dtype=float)
    if len(hours) == 0:
        return []
    first, last = np.floor(hours.min() / bin_hours), np.floor(hours.max() / bin_hours)
    rows = []
    for k in range(int(first), int(last) + 1):
        sel = (hours >= k * bin_hours) & (hours < (k + 1) * bin_hours)
        if not sel.any():
            continue
        m = _metrics_on(arrays, sel)
        row: dict[str, float | None] = {
            "hour_start": k * bin_hours,
            "hour_end": (k + 1) * bin_hours,
            "n": int(sel.sum()),
        }
        row.update({key: m[key] for key in BIN_KEYS if key in m})
        rows.append(row)
    return rows


def earliest_reliable_hour(
    bins: Sequence[dict], threshold: float = 0.99, consecutive: int = 2, key: str = "cls_auc"
) -> float | None:
    """Start hour of the first run of `consecutive` adjacent bins whose `key` is >= threshold; None if
    there is none (bins where the metric is undefined, e.g. one class only, break a run)."""
    ok = [b.get(key) is not None and b[key] >= threshold for b in bins]
    for i in range(len(bins) - consecutive + 1):
        adjacent = all(bins[j + 1]["hour_start"] == bins[j]["hour_end"] for j in range(i, i + consecutive - 1))
        if adjacent and all(ok[i : i + consecutive]):
            return float(bins[i]["hour_start"])
    return None


def per_stack_metrics(
    stack_ids: Sequence[str],
    arrays: Arrays,
) -> list[dict]:
    """One row per stack: frames, accuracy and time MAE (hours) over its frames."""
    ids = np.asarray(stack_ids)
    rows = []
    for sid in dict.fromkeys(ids.tolist()):
        sel = ids == sid
        m = _metrics_on(arrays, sel)
        row = {
            "stack_id": sid,
            "n": int(sel.sum()),
            "condition": "infected" if arrays["infected"][sel][0] else "uninfected",
        }
        row.update({k: m[k] for k in ("cls_acc", "reg_mae") if k in m})
        rows.append(row)
    return rows


def bootstrap_ci(
    stack_ids: Sequence[str],
    arrays: Arrays,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float] | None]:
    """Percentile confidence intervals `[low, high]` of every metric, resampling whole stacks with
    replacement. None where a metric is undefined in too many resamples (e.g. AUC with one class)."""
    ids = np.asarray(stack_ids)
    stacks = list(dict.fromkeys(ids.tolist()))
    members = {s: np.flatnonzero(ids == s) for s in stacks}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        pick = rng.choice(len(stacks), size=len(stacks), replace=True)
        sel = np.concatenate([members[stacks[i]] for i in pick])
        m = _metrics_on(arrays, sel)
        both_classes = len(np.unique(np.asarray(arrays["infected"])[sel])) == 2
        for k, v in m.items():
            # cls_* of a resample with one class only are undefined (or 0 by convention): leave them out
            if v is not None and (both_classes or not k.startswith("cls_")):
                draws.setdefault(k, []).append(v)
    alpha = (1.0 - level) / 2
    out: dict[str, list[float] | None] = {}
    for k, values in draws.items():
        if len(values) < 0.5 * n_boot:
            out[k] = None
            continue
        lo, hi = np.quantile(values, [alpha, 1 - alpha])
        out[k] = [float(lo), float(hi)]
    return out
