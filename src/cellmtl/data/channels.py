"""Which file channel is which: channels picked by index, or matched by name across files.

Microscopes and export scripts do not always write channels in the same order (one plate saved as
DAPI|GFP, the next as GFP|DAPI). Picking channels by index then feeds the model a different stain for
some stacks without any error. A manifest column `channels` naming each file's channels in file order
(`Mito|PLA|DAPI|ICP4`) makes the order explicit: every stack is then read by name, in the order of
the first stack (the reference) or of `data.channels` given as names. Without the column, files whose
metadata name every channel (OME channel names, ImageJ slice labels) are matched by those names when all
files agree; otherwise channels are indices into every file, and where ImageJ files show their channels in
other colours than the reference stack (their LUTs), a WARNING says the stains may be stored in another order.

The result is expressed in the reference stack's indices, so the rest of cellmtl (checkpoints, ONNX
metadata, the normaliser) keeps one list of channel indices; a stack whose order differs gets a
`StackInfo.channel_order` that its reader uses to fetch the right file channel.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cellmtl.data.manifest import StackRecord
from cellmtl.data.readers import StackInfo
from cellmtl.errors import BadInputError

CHANNEL_COLUMN = "channels"
SEPARATOR = "|"
FROM_MANIFEST = f"the manifest's {CHANNEL_COLUMN!r} column"
FROM_FILES = "the files' metadata"

log = logging.getLogger(__name__)


def declared_names(rec: StackRecord, info: StackInfo) -> tuple[str, ...] | None:
    """The stack's channel names from the manifest's `channels` column (None: the cell is empty or absent)."""
    raw = (rec.extra.get(CHANNEL_COLUMN) or "").strip()
    if not raw:
        return None
    names = tuple(n.strip() for n in raw.split(SEPARATOR))
    where = f"stack_id {rec.stack_id} ({rec.path}): manifest column {CHANNEL_COLUMN!r} {raw!r}"
    if any(not n for n in names):
        raise BadInputError(f"{where} has an empty name; write the names in file order separated by '{SEPARATOR}'")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise BadInputError(f"{where} names channel {dup!r} twice")
    if len(names) != info.n_channels:
        raise BadInputError(f"{where} names {len(names)} channel(s) but the file has {info.n_channels}")
    return names


def _picks_names(selection: Sequence[int] | Sequence[str] | None) -> bool:
    """`data.channels` (or a checkpoint's selection) given as names rather than indices."""
    return selection is not None and any(isinstance(c, str) for c in selection)


def _index_error(
    rec: StackRecord, what: str, selection: Sequence[int], bad: int, n: int, detail: str = ""
) -> BadInputError:
    return BadInputError(
        f"stack_id {rec.stack_id} ({rec.path}): {what} {list(selection)} asks for channel {bad} but the stack has "
        f"{n} channel(s){detail}"
    )


def _check_indices(records: Sequence[StackRecord], infos: Sequence[StackInfo], selection: Sequence[int] | None,
                   what: str) -> list[int]:
    """Index mode (no names anywhere): every stack has the selected channels, or all stacks have as many."""
    for rec, info in zip(records, infos, strict=True):
        if selection is not None:
            bad = [c for c in selection if c >= info.n_channels]
            if bad:
                raise _index_error(rec, what, selection, bad[0], info.n_channels)
        elif info.n_channels != infos[0].n_channels:
            raise BadInputError(
                f"stack_id {rec.stack_id} ({rec.path}) has {info.n_channels} channel(s) but stack_id "
                f"{records[0].stack_id} has {infos[0].n_channels}; set data.channels to pick common ones"
            )
    return list(selection) if selection is not None else list(range(infos[0].n_channels))


def match_channels(
    records: Sequence[StackRecord],
    infos: Sequence[StackInfo],
    selection: Sequence[int] | Sequence[str] | None,
    *,
    names: Sequence[str] | None = None,
    what: str = "data.channels",
    luts: Sequence[str] | None = None,
) -> tuple[list[StackInfo], list[int], list[str] | None]:
    """(infos, channel indices in the reference stack's order, their names or None).

    `selection`: `data.channels` (indices, names or None for all), or a checkpoint's indices with `names`
    its channel names (prediction: new stacks that name their channels are matched by those names; new
    stacks that do not are read at the checkpoint's indices, which is what the first training stack had).

    Names come from the manifest's `channels` column, else from the files' metadata (OME channel names,
    ImageJ slice labels) when every file has them. Manifest names are binding: every mismatch is a
    BadInputError naming the stack. Names in the files are the acquisition software's and may differ for
    the same stain (`DAPI` in one file, `Hoechst` in the next), so where they do not match, channels stay
    indices (with a warning) unless `data.channels` asks for names. Stacks read by index whose ImageJ
    display colours come in another order than `luts` (a checkpoint's training colours; default: the
    first stack's) get a warning (`lut_order_problems`)."""
    declared, source = stack_channel_names(records, infos)
    by_name = _picks_names(selection)
    if declared is not None:
        try:
            return _match_by_name(records, infos, declared, selection, names, what, source)
        except BadInputError as exc:
            if source == FROM_MANIFEST or by_name:
                raise
            log.warning("%s; the channel names in the files do not match, so channels are taken by index (a "
                        "manifest column %r naming each file's channels matches them by name)", exc, CHANNEL_COLUMN)
    elif by_name:
        raise BadInputError(
            f"{what} {list(selection or [])} picks channels by name, but the manifest has no {CHANNEL_COLUMN!r} "
            f"column naming each file's channels in order (e.g. DAPI{SEPARATOR}GFP) and not every file names them "
            "in its metadata (OME channel names, ImageJ slice labels)"
        )
    elif names is not None:
        log.warning(
            "%s are %s by name; these stacks do not name theirs (manifest column %r), so channels %s are "
            "read, in the order of the first training stack", what, ", ".join(names), CHANNEL_COLUMN,
            list(selection or []))
    for problem in lut_order_problems(records, infos, luts):
        log.warning("%s", problem)
    return list(infos), _check_indices(records, infos, selection, what), None


def lut_order_problems(
    records: Sequence[StackRecord], infos: Sequence[StackInfo], luts: Sequence[str] | None = None
) -> list[str]:
    """Stacks whose ImageJ display colours (LUTs) come in another order than `luts` (the training stacks',
    from a checkpoint) or than the first stack that has them: a lab's colours follow its stains (DAPI blue),
    so a different order is a strong hint that the file stores its stains in another order, which reading
    channels by index would silently mix up."""
    if luts is not None:
        ref_luts, ref_name = tuple(luts), "the model's training stacks"
    else:
        ref = next(((r, i) for r, i in zip(records, infos, strict=True) if i.luts is not None), None)
        if ref is None:
            return []
        ref_luts, ref_name = ref[1].luts, f"stack_id {ref[0].stack_id}"
    problems = []
    for rec, info in zip(records, infos, strict=True):
        if info.luts is not None and info.luts != ref_luts:
            problems.append(
                f"stack_id {rec.stack_id} ({rec.path}) shows its channels in the colours {SEPARATOR.join(info.luts)} "
                f"but {ref_name} in {SEPARATOR.join(ref_luts)} (ImageJ LUTs): its stains may be stored in another "
                f"order; name each file's channels in the manifest's {CHANNEL_COLUMN!r} column (e.g. DAPI|ICP4) so "
                "they are matched by name"
            )
    return problems


def check_rgb(records: Sequence[StackRecord], infos: Sequence[StackInfo], n_model: int) -> None:
    """An RGB(A) image fed to a model trained on all channels of other images: taking its first samples as
    the model's channels (R and G for a 2-channel model) would be a silent guess, so it is an error."""
    for rec, info in zip(records, infos, strict=True):
        if info.rgb and info.n_channels != n_model:
            raise BadInputError(
                f"stack_id {rec.stack_id} ({rec.path}) is an RGB image ({info.n_channels} samples) but the model "
                f"reads {n_model} channel(s); export the stack with the model's channels (e.g. as a "
                "multi-channel TIFF), or train on RGB images"
            )


def stack_channel_names(
    records: Sequence[StackRecord], infos: Sequence[StackInfo]
) -> tuple[list[tuple[str, ...]] | None, str]:
    """(every stack's channel names, where they come from): the manifest's column, else the files' metadata
    (OME channel names, ImageJ slice labels) when every file has it; (None, "") when the stacks are not all
    named."""
    declared = [declared_names(r, i) for r, i in zip(records, infos, strict=True)]
    named = [d is not None for d in declared]
    if any(named) and not all(named):
        k, j = named.index(True), named.index(False)
        raise BadInputError(
            f"stack_id {records[j].stack_id} ({records[j].path}) has no channel names in {FROM_MANIFEST} "
            f"but stack_id {records[k].stack_id} has; name every stack's channels or none"
        )
    if all(named):
        return [d for d in declared if d is not None], FROM_MANIFEST
    from_files = [i.channel_names for i in infos]
    if all(n is not None for n in from_files):
        return [n for n in from_files if n is not None], FROM_FILES
    return None, ""


@dataclass(frozen=True)
class TrainedChannels:
    """The channels a network was trained on (from its checkpoint): indices into its first training stack, their
    names and ImageJ colours where known, and whether training read every channel its stacks had."""

    indices: list[int]
    names: list[str] | None = None
    luts: list[str] | None = None
    all_of_them: bool = True


def checkpoint_channels(
    records: Sequence[StackRecord], infos: Sequence[StackInfo], trained: TrainedChannels
) -> tuple[list[StackInfo], list[int], list[str] | None]:
    """`match_channels` for the channels a network was trained on (resume, evaluate, compare, predict).

    A checkpoint's indices count from the first stack of its training manifest; reading them against today's
    first stack would feed other stains once rows are re-sorted or stacks added. So a network with names is
    matched by its names, and one trained without names reads its plain indices in every file, as in training."""
    what = "the model's input channels"
    if trained.names is None:
        if trained.all_of_them:  # trained on every channel its stacks had
            check_rgb(records, infos, len(trained.indices))
        for problem in lut_order_problems(records, infos, trained.luts):
            log.warning("%s", problem)
        return list(infos), _check_indices(records, infos, list(trained.indices), what), None
    return match_channels(records, infos, list(trained.indices), names=trained.names, what=what, luts=trained.luts)


def _check_names(rec: StackRecord, own: Sequence[str], wanted: Sequence[str], source: str, what: str) -> None:
    missing = [n for n in wanted if n not in own]
    if missing:
        raise BadInputError(
            f"stack_id {rec.stack_id} ({rec.path}) has no channel named {missing[0]!r} (its channels, from "
            f"{source}: {SEPARATOR.join(own)}); {what} are {', '.join(wanted)}"
        )


def _match_by_name(
    records: Sequence[StackRecord],
    infos: Sequence[StackInfo],
    declared: Sequence[tuple[str, ...]],
    selection: Sequence[int] | Sequence[str] | None,
    names: Sequence[str] | None,
    what: str,
    source: str,
) -> tuple[list[StackInfo], list[int], list[str]]:
    """Every stack names its channels (`declared`): read each by name, in the reference's indices."""
    by_name = _picks_names(selection)
    if names is not None:  # a checkpoint's channels, matched by name in new stacks
        indices, wanted = [int(c) for c in selection or []], list(names)
    else:
        ref = declared[0]
        if by_name:
            wanted = [str(c) for c in selection or []]
            _check_names(records[0], ref, wanted, source, what)
            indices = [ref.index(n) for n in wanted]
        else:
            indices = [int(c) for c in selection] if selection is not None else list(range(len(ref)))
            bad = [c for c in indices if c >= len(ref)]
            if bad:
                raise _index_error(records[0], what, indices, bad[0], len(ref), f" ({SEPARATOR.join(ref)}); to pick "
                                   "by name, quote names that look like numbers, e.g. ['488']")
            wanted = [ref[c] for c in indices]

    out: list[StackInfo] = []
    reordered: list[str] = []
    for rec, info, own in zip(records, infos, declared, strict=True):
        _check_names(rec, own, wanted, source, what)
        files = [own.index(n) for n in wanted]
        if files == indices:
            out.append(info)
            continue
        order = [-1] * (max(indices) + 1)
        for ref_c, file_c in zip(indices, files, strict=True):
            order[ref_c] = file_c
        reordered.append(f"{rec.stack_id} ({SEPARATOR.join(own)})")
        out.append(replace(info, channel_order=tuple(order)))
    if reordered:
        shown = ", ".join(reordered[:5]) + (f" and {len(reordered) - 5} more" if len(reordered) > 5 else "")
        log.info("channels %s matched by name (from %s); %d of %d stacks store them in another order: %s",
                 ", ".join(wanted), source, len(reordered), len(records), shown)
    return out, indices, wanted
