"""cellmtl.metrics against scikit-learn on random inputs, plus the edge cases a run can hit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_score,
    recall_score,
    roc_auc_score,
)

from cellmtl.metrics import (
    LOWER_IS_BETTER,
    METRIC_NAMES,
    classification_metrics,
    compute_metrics,
    format_metrics,
    metric_direction,
    regression_metrics,
    stack_time_slopes,
)

SEEDS = [0, 1, 2, 3, 7, 42]


def _random_cls(seed: int, n: int = 200, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, size=n), 0, 1)
    if ties:
        p = np.round(p, 1)  # many tied scores, incl. exactly at the threshold
    return y, p


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.8])
def test_classification_matches_sklearn(seed: int, ties: bool, threshold: float) -> None:
    y, p = _random_cls(seed, ties=ties)
    got = classification_metrics(y, p, threshold=threshold)
    pred = (p >= threshold).astype(int)
    assert got["cls_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert got["cls_acc"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert got["cls_precision"] == pytest.approx(precision_score(y, pred, zero_division=0), abs=1e-12)
    assert got["cls_recall"] == pytest.approx(recall_score(y, pred, zero_division=0), abs=1e-12)
    assert got["cls_f1"] == pytest.approx(f1_score(y, pred, zero_division=0), abs=1e-12)
    assert all(type(v) is float for v in got.values())


@pytest.mark.parametrize("seed", SEEDS)
def test_classification_accepts_bool_and_column_shapes(seed: int) -> None:
    y, p = _random_cls(seed)
    ref = classification_metrics(y, p)
    assert classification_metrics(y.astype(bool), p) == ref
    assert classification_metrics(y.astype(float)[:, None], p[:, None]) == ref
    assert classification_metrics(list(y), list(p)) == ref


def test_zero_division_gives_zero_like_sklearn() -> None:
    y = np.array([1, 1, 0, 0])
    p = np.array([0.1, 0.2, 0.3, 0.4])  # nothing predicted positive
    got = classification_metrics(y, p)
    pred = (p >= 0.5).astype(int)
    assert got["cls_precision"] == precision_score(y, pred, zero_division=0) == 0.0
    assert got["cls_recall"] == 0.0
    assert got["cls_f1"] == 0.0
    assert got["cls_acc"] == 0.5
    assert got["cls_auc"] == pytest.approx(roc_auc_score(y, p))


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_auc_is_none(label: int) -> None:
    y = np.full(10, label)
    p = np.linspace(0, 1, 10)
    got = classification_metrics(y, p)
    assert got["cls_auc"] is None
    pred = (p >= 0.5).astype(int)
    assert got["cls_acc"] == pytest.approx(accuracy_score(y, pred))
    assert got["cls_precision"] == pytest.approx(precision_score(y, pred, zero_division=0))
    assert got["cls_recall"] == pytest.approx(recall_score(y, pred, zero_division=0))
    assert got["cls_f1"] == pytest.approx(f1_score(y, pred, zero_division=0))


def test_empty_classification_is_all_none() -> None:
    got = classification_metrics(np.array([]), np.array([]))
    assert set(got) == {"cls_auc", "cls_acc", "cls_precision", "cls_recall", "cls_f1"}
    assert all(v is None for v in got.values())


def test_perfect_and_inverted_auc() -> None:
    y = np.array([0, 0, 1, 1])
    assert classification_metrics(y, np.array([0.1, 0.2, 0.8, 0.9]))["cls_auc"] == 1.0
    assert classification_metrics(y, np.array([0.9, 0.8, 0.2, 0.1]))["cls_auc"] == 0.0
    assert classification_metrics(y, np.full(4, 0.5))["cls_auc"] == 0.5


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_prob_raises(bad: float) -> None:
    p = np.array([0.1, bad, 0.9])
    with pytest.raises(ValueError, match="prob.*non-finite.*index 1"):
        classification_metrics(np.array([0, 1, 1]), p)


def test_bad_labels_and_lengths_raise() -> None:
    with pytest.raises(ValueError, match="0/1"):
        classification_metrics(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="length mismatch"):
        classification_metrics(np.array([0, 1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="length mismatch"):
        regression_metrics(np.zeros(3), np.zeros(3), mask=np.ones(2, dtype=bool))


def _random_reg(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    t = rng.uniform(0, 48, size=n)
    p = t + rng.normal(0, 2 + 3 * y, size=n)
    mask = rng.uniform(size=n) < 0.7
    return t, p, y, mask


@pytest.mark.parametrize("seed", SEEDS)
def test_regression_matches_sklearn_without_mask(seed: int) -> None:
    t, p, y, _ = _random_reg(seed)
    got = regression_metrics(t, p, infected=y)
    assert got["reg_mae"] == pytest.approx(mean_absolute_error(t, p), rel=1e-12)
    assert got["reg_mse"] == pytest.approx(mean_squared_error(t, p), rel=1e-12)
    assert got["reg_rmse"] == pytest.approx(math.sqrt(mean_squared_error(t, p)), rel=1e-12)
    inf, uninf = y == 1, y == 0
    assert got["reg_mae_infected"] == pytest.approx(np.abs(p[inf] - t[inf]).mean(), rel=1e-12)
    assert got["reg_mae_uninfected"] == pytest.approx(np.abs(p[uninf] - t[uninf]).mean(), rel=1e-12)
    assert all(type(v) is float for v in got.values())


@pytest.mark.parametrize("seed", SEEDS)
def test_regression_matches_sklearn_with_mask(seed: int) -> None:
    t, p, y, mask = _random_reg(seed)
    t_with_gaps = np.where(mask, t, np.nan)  # frames without a time target carry NaN, must be ignored
    got = regression_metrics(t_with_gaps, p, infected=y, mask=mask)
    assert got["reg_mae"] == pytest.approx(mean_absolute_error(t[mask], p[mask]), rel=1e-12)
    assert got["reg_mse"] == pytest.approx(mean_squared_error(t[mask], p[mask]), rel=1e-12)
    assert got["reg_rmse"] == pytest.approx(math.sqrt(mean_squared_error(t[mask], p[mask])), rel=1e-12)
    inf, uninf = mask & (y == 1), mask & (y == 0)
    assert got["reg_mae_infected"] == pytest.approx(np.abs(p[inf] - t[inf]).mean(), rel=1e-12)
    assert got["reg_mae_uninfected"] == pytest.approx(np.abs(p[uninf] - t[uninf]).mean(), rel=1e-12)


def test_regression_without_infected_has_no_per_class() -> None:
    t, p, _, _ = _random_reg(0)
    got = regression_metrics(t, p)
    assert got["reg_mae"] == pytest.approx(mean_absolute_error(t, p))
    assert got["reg_mae_infected"] is None and got["reg_mae_uninfected"] is None


def test_regression_empty_and_fully_masked_are_none() -> None:
    empty = regression_metrics(np.array([]), np.array([]), infected=np.array([]))
    assert all(v is None for v in empty.values())
    masked = regression_metrics(np.array([1.0, 2.0]), np.array([1.5, 2.5]), np.array([1, 0]), np.zeros(2, bool))
    assert all(v is None for v in masked.values())


def test_regression_one_class_only_other_is_none() -> None:
    got = regression_metrics(np.array([1.0, 2.0]), np.array([2.0, 4.0]), infected=np.array([1, 1]))
    assert got["reg_mae_infected"] == 1.5
    assert got["reg_mae_uninfected"] is None


def test_regression_non_finite_raises() -> None:
    with pytest.raises(ValueError, match="time_pred"):
        regression_metrics(np.array([1.0, 2.0]), np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="time_true"):
        regression_metrics(np.array([1.0, np.inf]), np.array([1.0, 2.0]))
    # the same non-finite true time outside the mask is fine
    got = regression_metrics(np.array([1.0, np.inf]), np.array([1.5, 2.0]), mask=np.array([True, False]))
    assert got["reg_mae"] == 0.5


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_compute_metrics_merges_and_is_json_safe(seed: int) -> None:
    y, prob = _random_cls(seed, n=300)
    t, p, _, mask = _random_reg(seed)
    got = compute_metrics(infected=y, prob=prob, time_true=t, time_pred=p, time_mask=mask)
    assert set(got) == set(METRIC_NAMES)
    assert got == {**classification_metrics(y, prob), **regression_metrics(t, p, infected=y, mask=mask)}
    json.dumps(got, allow_nan=False)


def test_compute_metrics_single_task() -> None:
    y, prob = _random_cls(0, n=300)
    t, p, _, _ = _random_reg(0)
    cls_only = compute_metrics(infected=y, prob=prob)
    assert set(cls_only) == {n for n in METRIC_NAMES if n.startswith("cls_")}
    reg_only = compute_metrics(infected=y, time_true=t, time_pred=p)
    assert set(reg_only) == {n for n in METRIC_NAMES if n.startswith("reg_")}
    assert compute_metrics(infected=y) == {}
    with pytest.raises(ValueError, match="time_true"):
        compute_metrics(infected=y, time_pred=p)


def test_compute_metrics_single_class_is_json_safe() -> None:
    y = np.zeros(5, dtype=int)
    got = compute_metrics(infected=y, prob=np.full(5, 0.2), time_true=np.arange(5.0), time_pred=np.arange(5.0))
    assert got["cls_auc"] is None
    assert got["reg_mae_infected"] is None
    assert got["reg_mae_uninfected"] == 0.0
    json.dumps(got, allow_nan=False)


@pytest.mark.parametrize(
    ("name", "direction"),
    [
        ("cls_auc", "max"),
        ("val_cls_auc", "max"),
        ("train_cls_f1", "max"),
        ("val_cls_acc", "max"),
        ("reg_mae", "min"),
        ("val_reg_mae", "min"),
        ("val_reg_mae_infected", "min"),
        ("reg_rmse", "min"),
        ("total_loss", "min"),
        ("val_total_loss", "min"),
        ("train_cls_loss", "min"),
        ("val_reg_loss", "min"),
    ],
)
def test_metric_direction(name: str, direction: str) -> None:
    assert metric_direction(name) == direction


@pytest.mark.parametrize("name", ["accuracy", "val_", "lr", "test_cls_auc", "val_val_cls_auc", ""])
def test_metric_direction_unknown_raises(name: str) -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        metric_direction(name)


def test_every_metric_has_a_direction() -> None:
    assert {"total_loss", "cls_loss", "reg_loss"} <= LOWER_IS_BETTER
    for name in METRIC_NAMES:
        assert metric_direction(name) == ("min" if name.startswith("reg_") else "max")


def test_format_metrics() -> None:
    m = {"cls_auc": 0.98761, "cls_acc": 0.95, "reg_mae": 1.23449, "reg_mse": None, "epochs": 3}
    assert format_metrics(m, ["cls_auc", "cls_acc", "reg_mae"]) == "cls_auc: 0.9876 | cls_acc: 0.9500 | reg_mae: 1.2345"
    assert format_metrics(m, ["reg_mse", "missing"]) == "reg_mse: n/a | missing: n/a"
    assert format_metrics(m, ["epochs"]) == "epochs: 3.0000"
    assert format_metrics({"cls_auc": np.float32(0.5)}, ("cls_auc",)) == "cls_auc: 0.5000"
    assert format_metrics(m, []) == ""


@pytest.mark.parametrize("seed", SEEDS)
def test_stack_time_slopes_match_polyfit_per_stack(seed: int) -> None:
    """Per class, the mean of np.polyfit's slope over stacks; masked frames, stacks with under 3 timed
    frames and stacks with one time only are left out."""
    rng = np.random.default_rng(seed)
    stack, t, p, y, m = [], [], [], [], []
    expected: dict[int, list[float]] = {0: [], 1: []}
    for s in range(8):
        n, label = int(rng.integers(5, 12)), s % 2
        tt = np.sort(rng.uniform(0, 20, n))
        pp = rng.uniform(-1, 2) * tt + rng.normal(0, 2, n)
        mm = np.ones(n, dtype=bool)
        mm[0] = False  # a pre-onset frame: its time is ignored
        tt[0] = np.nan
        expected[label].append(float(np.polyfit(tt[mm], pp[mm], 1)[0]))
        stack += [f"s{s}"] * n
        t.append(tt)
        p.append(pp)
        m.append(mm)
        y += [label] * n
    # left out: two timed frames only, and a stack whose frames share one time
    stack += ["short"] * 3 + ["flat"] * 4
    t += [np.array([np.nan, 1.0, 2.0]), np.full(4, 5.0)]
    p += [np.array([0.0, 9.0, -9.0]), np.arange(4.0)]
    y += [1] * 7
    m += [np.array([False, True, True]), np.ones(4, dtype=bool)]
    out = stack_time_slopes(np.array(stack), np.concatenate(t), np.concatenate(p), np.array(y), np.concatenate(m))
    assert out["reg_slope_infected"] == pytest.approx(np.mean(expected[1]), rel=1e-9)
    assert out["reg_slope_uninfected"] == pytest.approx(np.mean(expected[0]), rel=1e-9)


def test_stack_time_slopes_flat_head_and_missing_class() -> None:
    """One value per stack gives slope 0; a head that reads the clock gives 1; a class without stacks None."""
    t = np.tile(np.arange(6.0), 2)
    stack = np.repeat(["a", "b"], 6)
    flat = stack_time_slopes(stack, t, np.repeat([4.0, 7.0], 6), np.ones(12))
    assert flat == {"reg_slope_infected": 0.0, "reg_slope_uninfected": None}
    clock = stack_time_slopes(stack, t, t + 3.0, np.zeros(12))
    assert clock["reg_slope_uninfected"] == pytest.approx(1.0) and clock["reg_slope_infected"] is None
    # compute_metrics adds them when it is given the frames' stacks, and only then
    with_stack = compute_metrics(infected=np.zeros(12), time_true=t, time_pred=t + 3.0, stack=stack)
    assert with_stack["reg_slope_uninfected"] == pytest.approx(1.0) and with_stack["reg_slope_infected"] is None
    assert "reg_slope_uninfected" not in compute_metrics(infected=np.zeros(12), time_true=t, time_pred=t + 3.0)
    assert "reg_slope_uninfected" not in compute_metrics(infected=np.zeros(12), prob=np.full(12, 0.3), stack=stack)
    with pytest.raises(ValueError, match="time_pred"):
        stack_time_slopes(stack, t, np.full(12, np.nan), np.ones(12))
    # one stack whose pre-onset frames count as uninfected (pre_onset: as_uninfected): each class on its own
    mixed = stack_time_slopes(np.array(["c"] * 8), np.array([0, 1, 2, 0, 1, 2, 3, 4.0]),
                              np.array([0, 1, 2, 5, 5, 5, 5, 5.0]), np.array([0, 0, 0, 1, 1, 1, 1, 1]))
    assert mixed["reg_slope_uninfected"] == pytest.approx(1.0) and mixed["reg_slope_infected"] == pytest.approx(0.0)
