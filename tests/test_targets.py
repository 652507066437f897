import numpy as np
import pytest

from cellmtl.data.targets import hours_since_start, select_frames, time_targets


def test_hours_since_start_by_hand():
    np.testing.assert_allclose(hours_since_start(4, 0.5, 2.0), [2.0, 2.5, 3.0, 3.5])


def test_uninfected_time_is_elapsed_time():
    t, label, keep = time_targets(np.array([4.0, 5.0, 6.0]), False, None)
    np.testing.assert_allclose(t, [4.0, 5.0, 6.0])
    assert label.tolist() == [0, 0, 0] and keep.all()


def test_infected_time_is_hours_since_onset_and_drop_default():
    t, label, keep = time_targets(np.array([0.0, 1.0, 2.0, 3.0]), True, 1.5)
    np.testing.assert_allclose(t[keep], [0.5, 1.5])
    assert keep.tolist() == [False, False, True, True]
    assert label.tolist() == [1, 1, 1, 1]


def test_pre_onset_keep_gives_negative_targets():
    t, label, keep = time_targets(np.array([0.0, 1.0, 2.0]), True, 1.0, "keep")
    np.testing.assert_allclose(t, [-1.0, 0.0, 1.0])
    assert keep.all() and label.tolist() == [1, 1, 1]


def test_pre_onset_as_uninfected():
    t, label, keep = time_targets(np.array([0.0, 1.0, 2.0]), True, 1.5, "as_uninfected")
    np.testing.assert_allclose(t, [0.0, 1.0, 0.5])
    assert label.tolist() == [0, 0, 1] and keep.all()


def test_bad_policy_and_missing_onset():
    with pytest.raises(ValueError):
        time_targets(np.zeros(2), True, 0.0, "sometimes")
    with pytest.raises(ValueError):
        time_targets(np.zeros(2), True, None)


def test_frame_selection_stride_window_max():
    hours = hours_since_start(10, 1.0, 0.0)
    assert select_frames(hours).tolist() == list(range(10))
    assert select_frames(hours, stride=3).tolist() == [0, 3, 6, 9]
    assert select_frames(hours, hour_window=(2.0, 4.0)).tolist() == [2, 3, 4]
    assert select_frames(hours, max_per_stack=3).tolist() == [0, 4, 9]
    keep = hours >= 5
    assert select_frames(hours, candidates=keep, stride=2).tolist() == [5, 7, 9]
    assert select_frames(hours, stride=2, hour_window=(3, 9), max_per_stack=2).tolist() == [4, 8]
