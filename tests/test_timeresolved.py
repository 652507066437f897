import numpy as np
import pytest

from cellmtl.evaluation.timeresolved import binned_metrics, bootstrap_ci, earliest_reliable_hour, per_stack_metrics


def test_binned_metrics_by_hand():
    hours = np.array([0.0, 1.0, 2.9, 3.0, 4.0, 6.5])
    infected = np.array([1, 0, 1, 1, 0, 1])
    prob = np.array([0.9, 0.2, 0.4, 0.8, 0.6, 0.7])
    t_true = np.array([1.0, 1.0, 3.0, 4.0, 4.0, 6.0])
    t_pred = np.array([2.0, 1.0, 5.0, 4.0, 1.0, 6.5])
    mask = np.ones(6, bool)
    arrays = dict(infected=infected, prob=prob, time_true=t_true, time_pred=t_pred, time_mask=mask)
    bins = binned_metrics(hours, arrays, bin_hours=3.0)
    assert [(b["hour_start"], b["hour_end"], b["n"]) for b in bins] == [(0, 3, 3), (3, 6, 2), (6, 9, 1)]
    assert bins[0]["cls_acc"] == pytest.approx(2 / 3)  # 0.4 on an infected frame is a miss
    assert bins[0]["cls_auc"] == 1.0  # infected {0.9, 0.4} both above uninfected {0.2}
    assert bins[0]["reg_mae"] == pytest.approx((1 + 0 + 2) / 3)
    assert bins[0]["reg_mae_infected"] == pytest.approx(1.5) and bins[0]["reg_mae_uninfected"] == 0.0
    assert bins[1]["cls_acc"] == 0.5 and bins[1]["reg_mae"] == pytest.approx(1.5)
    assert bins[2]["cls_auc"] is None  # one class only


def test_earliest_reliable_hour():
    def b(start, auc):
        return {"hour_start": start, "hour_end": start + 3, "cls_auc": auc}

    assert earliest_reliable_hour([b(0, 0.9), b(3, 0.995), b(6, 0.999), b(9, 0.98)]) == 3.0
    assert earliest_reliable_hour([b(0, 0.995), b(3, 0.9), b(6, 0.999)]) is None
    assert earliest_reliable_hour([b(0, None), b(3, 1.0), b(9, 1.0)]) is None  # not adjacent
    assert earliest_reliable_hour([b(0, 1.0), b(3, 1.0)]) == 0.0


def test_per_stack_metrics():
    arrays = dict(infected=np.array([1, 1, 0]), prob=np.array([0.9, 0.1, 0.2]), time_true=np.array([1.0, 2.0, 5.0]),
                  time_pred=np.array([2.0, 2.0, 1.0]), time_mask=np.ones(3, bool))
    rows = per_stack_metrics(["a", "a", "b"], arrays)
    assert rows == [
        {"stack_id": "a", "n": 2, "condition": "infected", "cls_acc": 0.5, "reg_mae": 0.5},
        {"stack_id": "b", "n": 1, "condition": "uninfected", "cls_acc": 1.0, "reg_mae": 4.0},
    ]


def test_bootstrap_resamples_stacks():
    rng = np.random.default_rng(0)
    ids = np.repeat([f"s{k}" for k in range(8)], 10)
    infected = np.repeat([1, 0] * 4, 10)
    prob = np.clip(infected * 0.6 + rng.uniform(0, 0.4, 80), 0, 1)
    t = rng.uniform(0, 20, 80)
    pred = t + rng.normal(0, 2, 80)
    arrays = dict(infected=infected, prob=prob, time_true=t, time_pred=pred, time_mask=np.ones(80, bool))
    ci = bootstrap_ci(ids, arrays, n_boot=300, seed=1)
    assert ci == bootstrap_ci(ids, arrays, n_boot=300, seed=1)
    point = np.abs(pred - t).mean()
    assert ci["reg_mae"][0] <= point <= ci["reg_mae"][1]
    assert ci["cls_auc"] == [1.0, 1.0]  # perfectly separated in every resample with both classes
    # identical stacks: resampling stacks cannot change the metric
    same_arrays = dict(arrays, time_true=np.zeros(80), time_pred=np.ones(80))
    same = bootstrap_ci(ids, same_arrays, n_boot=50)
    assert same["reg_mae"] == [1.0, 1.0]
