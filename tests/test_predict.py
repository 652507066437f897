import numpy as np
import pytest

from cellmtl.metrics import theil_sen_slope
from cellmtl.predict import onset_note, stack_summary


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
    assert m["pred_condition"] == "uninfected" and m["est_onset_hour"] is None
    assert m["prob_infected"] == pytest.approx(0.1) and m["n_frames"] == 12
    assert m["frac_frames_infected"] == 0.0


def test_frac_frames_infected_shows_how_unanimous_the_call_is():
    # onset 4.5 h, frames at hours 1..12: the 4 frames before it look uninfected (p 0.2), the 8 after (p 0.9)
    (row,) = stack_summary(rows_for("a", 4.5))
    assert row["frac_frames_infected"] == pytest.approx(8 / 12, abs=1e-3)
    assert row["prob_infected"] == pytest.approx((4 * 0.2 + 8 * 0.9) / 12)
    # a stack split down the middle has a mean just under 0.5 and half its frames called infected
    split = [dict(r, prob_infected=0.95 if r["frame"] % 2 else 0.03) for r in rows_for("s", 0.0)]
    (half,) = stack_summary(split)
    assert half["pred_condition"] == "uninfected" and half["frac_frames_infected"] == 0.5


def test_onset_fit_slope_flags_a_time_head_that_ignores_the_clock():
    (good,) = stack_summary(rows_for("a", 2.0, outlier=True))
    assert good["onset_fit_slope"] == pytest.approx(1.0)
    flat = [dict(r, pred_time_hours=12.0) for r in rows_for("b", 2.0)]  # one time for every frame
    (bad,) = stack_summary(flat)
    assert bad["onset_fit_slope"] == pytest.approx(0.0) and bad["est_onset_hour"] is not None
    mock = [dict(r, prob_infected=0.1) for r in rows_for("m", 0.0)]
    assert stack_summary(mock)[0]["onset_fit_slope"] is None


def test_theil_sen_slope_by_hand():
    # 10 pairs: the 6 without the wild last point have slope 2, so the median is 2
    assert theil_sen_slope([0, 1, 2, 3, 4], [0, 2, 4, 6, 100]) == pytest.approx(2.0)
    assert theil_sen_slope([1, 1], [0, 5]) is None


def test_onset_note_names_stacks_whose_onset_cannot_be_trusted():
    good = stack_summary(rows_for("a", 2.0))
    flat = stack_summary([dict(r, pred_time_hours=12.0) for r in rows_for("b", 2.0)])
    mock = stack_summary([dict(r, prob_infected=0.1) for r in rows_for("m", 0.0)])
    assert onset_note(good + mock) is None  # slope 1, and a mock has no onset
    note = onset_note(good + flat + mock)
    assert note is not None and note.startswith("note: 1 of 2 stacks predicted infected") and "(b)" in note
    many = [dict(flat[0], stack_id=f"s{i}") for i in range(7)]
    assert "s0, s1, s2, s3, s4 and 2 more" in onset_note(many)
