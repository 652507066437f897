"""Error review picks, against hand-worked examples."""

import numpy as np

from cellmtl.evaluation.review import error_rows, top_errors
from cellmtl.reports.images import composite


def test_top_errors_by_hand():
    infected = np.array([1, 1, 0, 0, 0, -1])
    prob = np.array([0.9, 0.2, 0.6, 0.95, 0.1, 0.99])  # mistakes: frame 1 (err .8), 2 (.6), 3 (.95); 5 unknown
    t_true = np.array([1.0, 2.0, 3.0, np.nan, 5.0, np.nan])
    t_pred = np.array([1.5, 9.0, 3.0, 100.0, 2.0, 0.0])
    cls, tim = top_errors(infected, prob, t_true, t_pred, k=2)
    assert cls.tolist() == [3, 1]
    assert tim.tolist() == [1, 4]  # |7| then |3|; frame 3 has no target
    arrays = {"infected": infected, "prob": prob, "time_true": t_true, "time_pred": t_pred}
    rows = error_rows(arrays, [f"s{i}" for i in range(6)], np.arange(6), np.arange(6) * 2.0, cls, tim)
    assert [(r["kind"], r["stack_id"], r["error"]) for r in rows] == [
        ("classification", "s3", 0.95), ("classification", "s1", 0.8), ("time", "s1", 7.0), ("time", "s4", 3.0)]
    assert rows[0]["truth"] == "uninfected" and rows[0]["hours_since_start"] == 6.0


def test_top_errors_without_a_head_and_composite_range():
    cls, tim = top_errors(np.array([0, 1]), None, None, None, k=5)
    assert len(cls) == len(tim) == 0
    for c in (1, 2, 4):
        rgb = composite(np.random.default_rng(0).normal(size=(c, 8, 8)))
        assert rgb.shape == (8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
