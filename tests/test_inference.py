import numpy as np
import pytest

from cellmtl.inference import stack_summary


def rows_for(stack_id, onset, n=12, prob=0.9, noise=0.0, seed=0, outlier=False):
    rng = np.random.default_rng(seed)
    rows = []
    for f in range(n):
        hours = 1.0 + f
        pred_time = hours - onset + rng.normal(0, noise)
        p = prob if hours >= onset else 0.2  # pre-onset frames look uninfected and do not vote
        rows.append({"stack_id": stack_id, "frame": f, "hours_since_start": hours, "prob_infected": p,
                     "pred_condition": "infected" if p >= 0.5 else "uninfected",
                     "pred_time_hours": pred_time, "condition": "infected"})
    if outlier:
        rows[-1]["pred_time_hours"] = -50.0
    return rows


@pytest.mark.parametrize("onset", [1.0, 2.5, 3.0])
def test_onset_estimate_recovers_known_onsets(onset):
    (row,) = stack_summary(rows_for("a", onset, noise=0.8, seed=int(onset * 10)))
    assert row["pred_condition"] == "infected"
    assert abs(row["est_onset_hour"] - onset) < 1.0


def test_onset_median_resists_outliers_and_mock_has_none():
    (row,) = stack_summary(rows_for("a", 2.0, outlier=True))
    assert row["est_onset_hour"] == pytest.approx(2.0)
    mock = [dict(r, prob_infected=0.1) for r in rows_for("m", 0.0)]
    (m,) = stack_summary(mock)
    assert m["pred_condition"] == "uninfected" and m["est_onset_hour"] == ""
    assert m["prob_infected"] == pytest.approx(0.1) and m["n_frames"] == 12
