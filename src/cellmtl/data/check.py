"""`cellmtl check-data`: read every stack of a config and report what training would see and do to it.

The report says what cellmtl does to the data (Z projection, resizing, where each frame interval came
from), lists every problem it finds (including the warnings training would print) in one list, and is
printed whole even when a stack turns out unreadable, so a user sees all stacks and all culprits at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from cellmtl.config import Config
from cellmtl.data.dataset import Experiment, load_experiment, stack_index
from cellmtl.data.readers import check_finite_stack
from cellmtl.data.targets import hours_since_start
from cellmtl.errors import BadInputError

COLUMNS = ("stack_id", "condition", "onset_h", "format", "T", "C", "Z", "Y", "X", "dtype", "hours", "interval_h",
           "split", "frames_kept")
IMBALANCE = 10.0  # a stack with this many times the frames of another gets a note: it dominates training


@dataclass
class DataReport:
    """What check-data prints: the per-stack table, notes on what training does to the frames, problems
    (warnings: training would go on) and errors (unreadable stacks: exit 2)."""

    table: str
    summary: list[str]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [self.table, "", *self.summary]
        if self.notes:
            lines += ["", "what training does with these frames:", *(f"  - {n}" for n in self.notes)]
        issues = self.problems + self.errors
        if issues:
            lines += ["", f"{len(issues)} problem(s):", *(f"  - {p}" for p in issues)]
        else:
            lines += ["", "no problems found"]
        return "\n".join(lines)


@contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """WARNING lines of cellmtl's loggers, kept for the report instead of printed around it."""
    messages: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(" ".join(record.getMessage().split()))

    log = logging.getLogger("cellmtl")
    handler, saved = _Keep(logging.WARNING), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.propagate = saved


def _table(rows: list[dict[str, str]]) -> str:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def frame_notes(exp: Experiment, image_size: int) -> list[str]:
    """Z projection, resizing (and where it changes the aspect ratio), and frame-count imbalance."""
    notes = []
    with_z = [(r.stack_id, i.n_z) for r, i in zip(exp.records, exp.infos, strict=True) if i.n_z > 1]
    if with_z:
        shown = ", ".join(f"{sid} ({nz} planes)" for sid, nz in with_z[:5])
        notes.append(f"Z: {_plural(len(with_z), 'stack')} hold Z planes, max-projected into one image per frame "
                     f"and channel: {shown}{' ...' if len(with_z) > 5 else ''}")
    sizes: dict[tuple[int, int], list[str]] = {}
    for r, i in zip(exp.records, exp.infos, strict=True):
        sizes.setdefault((i.height, i.width), []).append(r.stack_id)
    for (h, w), sids in sorted(sizes.items()):
        which = f"{_plural(len(sids), 'stack')} ({', '.join(sids[:3])}{' ...' if len(sids) > 3 else ''})"
        if h == w == image_size:
            notes.append(f"kept at {h} x {w} px (data.image_size; no resizing): {which}")
            continue
        scale = f"x {image_size / w:.3g} in X, x {image_size / h:.3g} in Y"
        how = "uniform" if h == w else f"non-uniform, the aspect ratio changes: {scale}"
        notes.append(f"resized from {h} x {w} (Y x X) to {image_size} x {image_size} px ({how}): {which}")
    return notes


def imbalance_problem(exp: Experiment) -> str | None:
    counts = [(i.n_frames, r.stack_id) for r, i in zip(exp.records, exp.infos, strict=True)]
    (lo, lo_id), (hi, hi_id) = min(counts), max(counts)
    if hi < IMBALANCE * lo:
        return None
    return (f"frame counts differ {hi / lo:.0f}x: stack_id {hi_id} has {hi} frames, stack_id {lo_id} {lo}; every "
            "frame weighs the same in training, so the longest stacks dominate (data.frames.train.max_per_stack "
            "caps frames per stack)")


def check_data(cfg: Config) -> DataReport:
    """Probe and fully read every stack (integrity, NaN/Inf), then tabulate shapes, time ranges, interval
    sources and the frames each split keeps. Problems with the manifest or config raise BadInputError at once
    (there is no table to show without them); unreadable frames are collected into `errors`."""
    with captured_warnings() as warnings:
        exp = load_experiment(cfg)
    rows = []
    errors: list[str] = []
    frames = {"train": 0, "val": 0, "test": 0}
    stacks = {(sp, c): 0 for sp in frames for c in ("infected", "uninfected")}
    for i, (rec, info) in enumerate(zip(exp.records, exp.infos, strict=True)):
        try:
            check_finite_stack(info)
        except BadInputError as exc:
            errors.append(f"stack_id {rec.stack_id}: {exc}")
        split = exp.splits.get(rec.stack_id, "-")
        kept = 0
        if split in frames:
            kept = len(stack_index(rec, info, i, getattr(cfg.data.frames, split), cfg.data.pre_onset))
            frames[split] += kept
            stacks[(split, rec.condition)] += 1
        hours = hours_since_start(info.n_frames, rec.frame_interval_hours, rec.start_hour, rec.frame_hours)
        interval = f"{rec.frame_interval_hours:g}" + ("" if rec.frame_hours is None else " (irregular)")
        rows.append(
            {
                "stack_id": rec.stack_id,
                "condition": rec.condition,
                "onset_h": "-" if rec.onset_hour is None else f"{rec.onset_hour:g}",
                "format": info.format,
                "T": str(info.n_frames),
                "C": str(info.n_channels),
                "Z": str(info.n_z),
                "Y": str(info.height),
                "X": str(info.width),
                "dtype": info.dtype,
                "hours": f"{hours.min():g}-{hours.max():g}",
                "interval_h": f"{interval} ({rec.interval_source})",
                "split": split,
                "frames_kept": str(kept),
            }
        )
    summary = [
        f"{len(exp.records)} stacks, channels used {exp.channels}"
        + (f" ({', '.join(exp.channel_names)}, matched by name)" if exp.channel_names else "")
        + f", pre_onset={cfg.data.pre_onset}",
    ]
    for sp in frames:
        summary.append(
            f"{sp:5s}: {stacks[(sp, 'infected')]} infected + {stacks[(sp, 'uninfected')]} uninfected stacks, "
            f"{frames[sp]} frames"
        )
    problems = list(warnings)
    imbalance = imbalance_problem(exp)
    if imbalance:
        problems.append(imbalance)
    return DataReport(_table(rows), summary, frame_notes(exp, cfg.data.image_size), problems, errors)
