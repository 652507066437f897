"""Time targets and frame selection (SPEC section 1): pure functions of numbers, tested by hand.

Hours are hours since experiment start unless a name says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PRE_ONSET_POLICIES = ("drop", "keep", "as_uninfected")
UNINFECTED_TIME = ("elapsed", "zero", "ignore")


def hours_since_start(
    n_frames: int, frame_interval_hours: float, start_hour: float = 0.0, frame_hours: Sequence[float] | None = None
) -> np.ndarray:
    """`start_hour + i * frame_interval_hours` for i in 0..n_frames-1, float64 [T] hours; where the file
    records each frame's own time (`frame_hours`, hours since its first frame), `start_hour + frame_hours[i]`."""
    if frame_hours is not None:
        if len(frame_hours) != n_frames:
            raise ValueError(f"{len(frame_hours)} frame times for {n_frames} frames")
        return start_hour + np.asarray(frame_hours, dtype=np.float64)
    return start_hour + np.arange(n_frames, dtype=np.float64) * frame_interval_hours


def time_targets(
    hours: np.ndarray,
    infected: bool,
    onset_hour: float | None,
    pre_onset: str = "drop",
    uninfected_time: str = "elapsed",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame (time_target hours, infected label, keep mask) for one stack.

    infected stacks: target = hours - onset (hours since infection onset);
    uninfected stacks: target = hours (hours since experiment start), so mock wells keep a time course.
    Infected frames before onset follow `pre_onset`: `drop` (keep=False), `keep` (negative targets),
    `as_uninfected` (label 0, target = hours since start, as for a mock well).
    `uninfected_time` then sets the target of every label-0 frame: `elapsed` (hours since start, as
    above), `zero` (0 h: "no infection yet"), or `ignore` (NaN: no time loss, not in time metrics).
    """
    if pre_onset not in PRE_ONSET_POLICIES:
        raise ValueError(f"pre_onset must be one of {PRE_ONSET_POLICIES}, got {pre_onset!r}")
    if uninfected_time not in UNINFECTED_TIME:
        raise ValueError(f"uninfected_time must be one of {UNINFECTED_TIME}, got {uninfected_time!r}")
    target, label, keep = _elapsed_targets(np.asarray(hours, dtype=np.float64), infected, onset_hour, pre_onset)
    if uninfected_time != "elapsed":
        target[label == 0] = 0.0 if uninfected_time == "zero" else np.nan
    return target, label, keep


def _elapsed_targets(
    hours: np.ndarray, infected: bool, onset_hour: float | None, pre_onset: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keep = np.ones(hours.shape, dtype=bool)
    if not infected:
        return hours.copy(), np.zeros(hours.shape, dtype=np.int8), keep
    if onset_hour is None:
        raise ValueError("an infected stack needs an onset hour")
    target = hours - onset_hour
    label = np.ones(hours.shape, dtype=np.int8)
    before = target < 0
    if pre_onset == "drop":
        keep &= ~before
    elif pre_onset == "as_uninfected":
        label[before] = 0
        target[before] = hours[before]
    return target, label, keep


def select_frames(
    hours: np.ndarray,
    *,
    stride: int = 1,
    hour_window: tuple[float, float] | None = None,
    max_per_stack: int | None = None,
    candidates: np.ndarray | None = None,
) -> np.ndarray:
    """Indices (int64, ascending) of the frames a split uses.

    Order: `candidates` mask (e.g. pre-onset dropping), every `stride`-th frame, `hour_window`
    (inclusive, hours since start), then at most `max_per_stack` frames evenly spaced over what is left.
    """
    idx = np.arange(len(hours))
    if candidates is not None:
        idx = idx[np.asarray(candidates, dtype=bool)]
    idx = idx[::stride]
    if hour_window is not None:
        lo, hi = hour_window
        h = np.asarray(hours)[idx]
        idx = idx[(h >= lo) & (h <= hi)]
    if max_per_stack is not None and len(idx) > max_per_stack:
        pick = np.unique(np.round(np.linspace(0, len(idx) - 1, max_per_stack)).astype(np.int64))
        idx = idx[pick]
    return idx.astype(np.int64)
