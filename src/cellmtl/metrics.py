"""Evaluation metrics for the two heads: infected vs uninfected, and time in hours.

Everything here is a pure numpy function returning plain python floats (or ``None`` where a metric is
undefined, e.g. AUC with one class present), so results go straight into JSON logs and never hold NaN.
Scikit-learn is the reference the tests compare against; we do not call it here to keep the numbers
(and their edge cases) under our control.

Non-finite inputs (NaN/inf in probabilities, predicted or true times) raise ``ValueError``: a NaN metric
would silently poison model selection, and a non-finite prediction means the model itself is broken.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

CLS_METRICS: tuple[str, ...] = ("cls_auc", "cls_acc", "cls_precision", "cls_recall", "cls_f1")
REG_METRICS: tuple[str, ...] = ("reg_mae", "reg_rmse", "reg_mse", "reg_mae_infected", "reg_mae_uninfected")
METRIC_NAMES: tuple[str, ...] = CLS_METRICS + REG_METRICS
# Diagnostics, not selection metrics: does the time head follow the clock inside a stack? (see stack_time_slopes)
SLOPE_METRICS: tuple[str, ...] = ("reg_slope_infected", "reg_slope_uninfected")
MIN_SLOPE_FRAMES = 3
FLAT_SLOPE = 0.5  # under this, training's and predict's notes say the time output does not follow the clock
LOSS_NAMES: tuple[str, ...] = ("total_loss", "cls_loss", "reg_loss")
LOWER_IS_BETTER: frozenset[str] = frozenset(LOSS_NAMES + REG_METRICS)

_SPLIT_PREFIXES: tuple[str, ...] = ("val_", "train_")


def metric_direction(name: str) -> str:
    """Whether a logged quantity improves upwards ('max') or downwards ('min'), for checkpoint selection.

    Accepts bare names ('cls_auc') and split-prefixed ones ('val_reg_mae', 'train_total_loss').
    """
    base = name
    for prefix in _SPLIT_PREFIXES:
        if base.startswith(prefix):
            base = base[len(prefix) :]
            break
    if base in LOWER_IS_BETTER:
        return "min"
    if base in METRIC_NAMES:
        return "max"
    known = ", ".join(sorted(set(METRIC_NAMES) | set(LOSS_NAMES)))
    raise ValueError(f"unknown metric {name!r}; known (optionally prefixed with 'val_'/'train_'): {known}")


def _as_1d(values: object, dtype: type = float) -> np.ndarray:
    """Flatten to 1-D so (N,) and (N, 1) head outputs are both accepted."""
    arr = np.asarray(values, dtype=dtype)
    return arr.reshape(-1)


def _check_same_length(**arrays: np.ndarray) -> int:
    lengths = {name: arr.shape[0] for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"length mismatch: {lengths}")
    return next(iter(lengths.values()))


def _check_finite(name: str, arr: np.ndarray) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise ValueError(
            f"{name} has {idx.size} non-finite value(s) (NaN/inf), first at index {int(idx[0])}: {arr[idx[0]]!r}"
        )


def _labels(infected: object) -> np.ndarray:
    """Binary ground truth as a bool array of shape (N,); accepts bool, 0/1 ints or 0./1. floats."""
    arr = _as_1d(infected, dtype=float)
    ok = (arr == 0) | (arr == 1)
    if not ok.all():
        idx = int(np.flatnonzero(~ok)[0])
        raise ValueError(f"infected must be 0/1 (or bool); got {arr[idx]!r} at index {idx}")
    return arr == 1


def _rank_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney U statistic with average ranks, so tied scores count 1/2 (as sklearn)."""
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each distinct score
    ranks = avg_rank[inverse.reshape(-1)]
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _safe_div(num: float, den: float) -> float:
    """sklearn's zero_division=0: an empty denominator gives 0.0 rather than NaN."""
    return float(num / den) if den > 0 else 0.0


def classification_metrics(infected: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float | None]:
    """AUC, accuracy, precision, recall, F1 of the infected head; 'infected' is the positive class.

    infected: (N,) 0/1 truth; prob: (N,) P(infected); predicted positive when ``prob >= threshold``.
    cls_auc is None when only one class is present; all are None for N == 0. Precision/recall/F1 with an
    empty denominator are 0.0 (sklearn's ``zero_division=0``). Non-finite prob raises ValueError.
    """
    y = _labels(infected)
    p = _as_1d(prob)
    n = _check_same_length(infected=y, prob=p)
    if n == 0:
        return dict.fromkeys(CLS_METRICS, None)
    _check_finite("prob", p)

    pred = p >= threshold
    tp = float(np.sum(pred & y))
    fp = float(np.sum(pred & ~y))
    fn = float(np.sum(~pred & y))
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    n_pos = int(y.sum())
    return {
        "cls_auc": _rank_auc(y, p) if 0 < n_pos < n else None,
        "cls_acc": float(np.mean(pred == y)),
        "cls_precision": precision,
        "cls_recall": recall,
        # 2TP / (2TP + FP + FN) equals the harmonic mean, and is 0 (not NaN) when TP == 0.
        "cls_f1": _safe_div(2 * tp, 2 * tp + fp + fn),
    }


def _mae(err: np.ndarray) -> float | None:
    return float(np.mean(np.abs(err))) if err.size else None


def regression_metrics(
    time_true: np.ndarray,
    time_pred: np.ndarray,
    infected: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, float | None]:
    """MAE / RMSE / MSE of the time head in hours (MSE in hours²), plus MAE split by true class.

    All inputs are (N,). ``mask`` (bool) marks samples that have a time target; the others are ignored,
    so their time_true may be NaN. Without ``infected`` the per-class MAEs are None; any metric with no
    samples is None. Non-finite time_pred (anywhere) or time_true (within the mask) raises ValueError.
    """
    t = _as_1d(time_true)
    p = _as_1d(time_pred)
    arrays = {"time_true": t, "time_pred": p}
    y = None
    if infected is not None:
        y = _labels(infected)
        arrays["infected"] = y
    m = None
    if mask is not None:
        m = _as_1d(mask, dtype=bool)
        arrays["mask"] = m
    n = _check_same_length(**arrays)
    if m is None:
        m = np.ones(n, dtype=bool)

    _check_finite("time_pred", p)
    _check_finite("time_true (where mask is True)", np.where(m, t, 0.0))

    err = p[m] - t[m]
    mse = float(np.mean(err**2)) if err.size else None
    out: dict[str, float | None] = {
        "reg_mae": _mae(err),
        "reg_rmse": math.sqrt(mse) if mse is not None else None,
        "reg_mse": mse,
        "reg_mae_infected": None,
        "reg_mae_uninfected": None,
    }
    if y is not None:
        out["reg_mae_infected"] = _mae(p[m & y] - t[m & y])
        out["reg_mae_uninfected"] = _mae(p[m & ~y] - t[m & ~y])
    return out


def stack_time_slopes(
    stack: np.ndarray,
    time_true: np.ndarray,
    time_pred: np.ndarray,
    infected: np.ndarray,
    time_mask: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Per class, the mean over stacks of the least-squares slope of predicted on true time within the stack.

    MAE alone cannot tell a time head that reads the clock from one that gives every new well a single value
    near the training mean: both can score 4-5 h. The slope can (about 1 vs about 0), and a slope near 0 means
    `predict`'s onset estimate for such stacks is not to be trusted. Stacks with fewer than MIN_SLOPE_FRAMES
    timed frames of the class, or one time only, are left out; a class with no such stack gets None. Inputs are (N,);
    `time_mask` marks frames with a time target (the keywords match `compute_metrics`).
    """
    st = np.asarray(stack).reshape(-1)
    t, p, y = _as_1d(time_true), _as_1d(time_pred), _labels(infected)
    m = np.ones(len(t), dtype=bool) if time_mask is None else _as_1d(time_mask, dtype=bool)
    _check_same_length(stack=st, time_true=t, time_pred=p, infected=y, mask=m)
    slopes: dict[bool, list[float]] = {True: [], False: []}
    for label in (True, False):  # a stack's frames of each class apart (pre_onset: as_uninfected mixes them)
        for sid in np.unique(st[m & (y == label)]):
            sel = m & (y == label) & (st == sid)
            tt = t[sel]
            if sel.sum() < MIN_SLOPE_FRAMES or np.ptp(tt) == 0:
                continue
            _check_finite("time_pred", p[sel])
            tc = tt - tt.mean()
            slopes[label].append(float(np.dot(tc, p[sel] - p[sel].mean()) / np.dot(tc, tc)))
    return {
        "reg_slope_infected": float(np.mean(slopes[True])) if slopes[True] else None,
        "reg_slope_uninfected": float(np.mean(slopes[False])) if slopes[False] else None,
    }


def compute_metrics(
    *,
    infected: np.ndarray,
    prob: np.ndarray | None = None,
    time_true: np.ndarray | None = None,
    time_pred: np.ndarray | None = None,
    time_mask: np.ndarray | None = None,
    stack: np.ndarray | None = None,
) -> dict[str, float | None]:
    """All metrics a run logs: cls_* when ``prob`` is given, reg_* when ``time_pred`` is given, and the
    within-stack slopes (``stack_time_slopes``) when ``stack`` (each frame's stack id) is given too.

    Single-task runs pass only their head's output and get only its keys. Values are python floats or
    None (JSON-serialisable, never NaN). ``time_pred`` without ``time_true`` is a ValueError.
    """
    out: dict[str, float | None] = {}
    if prob is not None:
        out.update(classification_metrics(infected, prob))
    if time_pred is not None:
        if time_true is None:
            raise ValueError("time_pred given without time_true")
        out.update(regression_metrics(time_true, time_pred, infected=infected, mask=time_mask))
        if stack is not None:
            out.update(stack_time_slopes(stack, time_true, time_pred, infected, time_mask))
    return out


def format_metrics(metrics: Mapping[str, object], keys: Sequence[str]) -> str:
    """One log line, e.g. 'cls_auc: 0.9876 | reg_mae: 1.2345'; None or a missing key shows as 'n/a'."""
    parts = []
    for key in keys:
        value = metrics.get(key)
        if value is None:
            text = "n/a"
        elif isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            text = f"{float(value):.4f}"
        else:
            text = str(value)
        parts.append(f"{key}: {text}")
    return " | ".join(parts)


Z90 = 1.6448536269514722  # standard normal quantile 0.95: a central 90% interval is mean +/- Z90 * std


def interval_coverage(
    time_true: np.ndarray, time_pred: np.ndarray, time_std: np.ndarray, mask: np.ndarray | None = None
) -> float | None:
    """Share of frames whose true time lies in the predicted central 90% Gaussian interval
    `pred +/- 1.645 * std` (hours). A calibrated model gives about 0.9. None when no frame has a target."""
    t, p, s = _as_1d(time_true), _as_1d(time_pred), _as_1d(time_std)
    keep = np.isfinite(t) if mask is None else (_as_1d(mask, dtype=bool) & np.isfinite(t))
    if not keep.any():
        return None
    return float(np.mean(np.abs(t[keep] - p[keep]) <= Z90 * s[keep]))


def theil_sen_slope(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Median of pairwise slopes (dy/dx) over pairs with distinct x: a line fit that a few wild points
    cannot move. None with fewer than two distinct x."""
    xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
    i, j = np.triu_indices(len(xa), k=1)
    dx = xa[j] - xa[i]
    keep = dx != 0
    return float(np.median((ya[j] - ya[i])[keep] / dx[keep])) if keep.any() else None
