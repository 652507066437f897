"""Train/val/test assignment by stack, never by frame: frames of one well are not independent.

Precedence: the config's `train_stacks`/`val_stacks`/`test_stacks`, then the manifest's `split`
column, then an automatic split that is stratified by condition, grouped by `group` (a plate, well or
donor never sits in two splits) and seeded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from cellmtl.data.manifest import StackRecord
from cellmtl.errors import BadInputError

log = logging.getLogger(__name__)


def splits_from_lists(
    records: Sequence[StackRecord], train: Sequence[str], val: Sequence[str], test: Sequence[str]
) -> dict[str, str]:
    known = {r.stack_id for r in records}
    out: dict[str, str] = {}
    for name, ids in (("train_stacks", train), ("val_stacks", val), ("test_stacks", test)):
        split = name.removesuffix("_stacks")
        for sid in ids:
            if sid not in known:
                raise BadInputError(f"config data.{name}: unknown stack_id {sid!r}")
            if sid in out:
                raise BadInputError(f"config data.{name}: stack_id {sid!r} is already in {out[sid]}")
            out[sid] = split
    if not train:
        # Unlisted stacks train; with an explicit train list they are left out on purpose.
        for r in records:
            out.setdefault(r.stack_id, "train")
    return out


def _auto_take(
    groups: dict[str, list[StackRecord]], order: list[str], want_pos: int, want_neg: int
) -> list[str]:
    """Greedily take whole groups (in `order`) until the wanted number of each class is reached."""
    taken: list[str] = []
    pos = neg = 0
    for g in order:
        gp = sum(1 for r in groups[g] if r.infected)
        gn = len(groups[g]) - gp
        if (pos >= want_pos or gp == 0) and (neg >= want_neg or gn == 0):
            continue
        if pos + gp > max(want_pos, 1) + 1 or neg + gn > max(want_neg, 1) + 1:
            continue  # a big group would overshoot; try smaller ones first
        taken.append(g)
        pos, neg = pos + gp, neg + gn
        if pos >= want_pos and neg >= want_neg:
            break
    return taken


def auto_split(
    records: Sequence[StackRecord], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Grouped, class-stratified random split; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[StackRecord]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    order = [str(g) for g in rng.permutation(sorted(groups))]
    n_pos = sum(1 for r in records if r.infected)
    n_neg = len(records) - n_pos
    out: dict[str, str] = {}
    for split, frac in (("test", test_fraction), ("val", val_fraction)):
        if frac <= 0:
            continue
        free = [g for g in order if g not in out]
        want_pos, want_neg = max(1, round(frac * n_pos)), max(1, round(frac * n_neg))
        for g in _auto_take(groups, free, want_pos, want_neg):
            out[g] = split
    return {r.stack_id: out.get(r.group, "train") for r in records}


def assign_splits(
    records: Sequence[StackRecord],
    *,
    train_stacks: Sequence[str] = (),
    val_stacks: Sequence[str] = (),
    test_stacks: Sequence[str] = (),
    val_fraction: float = 0.25,
    test_fraction: float = 0.0,
    seed: int = 0,
    need_both_classes: bool = True,
) -> dict[str, str]:
    """stack_id -> 'train' | 'val' | 'test' (stacks left out are absent). Raises BadInputError when a
    split would be empty, or hold one class only when classification needs both."""
    if train_stacks or val_stacks or test_stacks:
        splits = splits_from_lists(records, train_stacks, val_stacks, test_stacks)
        source = "config data.*_stacks"
    elif any(r.split for r in records):
        splits = {r.stack_id: (r.split or "train") for r in records}
        source = "manifest split column"
    else:
        splits = auto_split(records, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        source = "automatic split"
    check_splits(records, splits, source=source, need_both_classes=need_both_classes)
    return splits


def check_splits(
    records: Sequence[StackRecord], splits: dict[str, str], *, source: str, need_both_classes: bool
) -> None:
    by_id = {r.stack_id: r for r in records}
    for split in ("train", "val", "test"):
        members = [by_id[s] for s, sp in splits.items() if sp == split]
        if not members:
            if split == "test":
                continue
            raise BadInputError(
                f"{source}: the {split} split is empty ({len(records)} stacks in {len({r.group for r in records})} "
                "groups; a group is never split)"
            )
        classes = {r.infected for r in members}
        if need_both_classes and len(classes) < 2:
            only = "infected" if True in classes else "uninfected"
            raise BadInputError(
                f"{source}: the {split} split holds only {only} stacks "
                f"({', '.join(r.stack_id for r in members[:5])}); it needs both classes"
            )
    leaked = _groups_in_several_splits(records, splits)
    if leaked:
        # Explicit splits are the user's call; say so loudly, since frames of one well leak information.
        log.warning("%s: group %r has stacks in more than one split (possible leakage)", source, leaked)


def _groups_in_several_splits(records: Sequence[StackRecord], splits: dict[str, str]) -> str | None:
    seen: dict[str, str] = {}
    for r in records:
        split = splits.get(r.stack_id)
        if split is None:
            continue
        if seen.setdefault(r.group, split) != split:
            return r.group
    return None
