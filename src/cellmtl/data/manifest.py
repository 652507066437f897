"""The manifest (SPEC section 3): one row per stack, validated into `StackRecord`s.

Manifests are written by spreadsheets as often as by scripts, so the table is read as they save it
(`cellmtl.data.table`). Every problem is a `BadInputError` naming the manifest file, the row (as a
spreadsheet line number) and the column or value at fault; every bad row is reported in one go, so a
96-row plate manifest is not fixed one error at a time.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from cellmtl.data.table import read_table
from cellmtl.errors import BadInputError, all_culprits

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("stack_id", "path", "condition")
KNOWN_COLUMNS = REQUIRED_COLUMNS + (
    "infection_onset_hour",
    "frame_interval_hours",
    "start_hour",
    "split",
    "group",
)
# Condition words, compared after lower-casing and dropping spaces, hyphens and underscores ("Mock-infected",
# "not infected", "non_infected"): the words virologists write for their controls.
INFECTED_WORDS = frozenset({"infected", "inf"})
UNINFECTED_WORDS = frozenset(
    {"uninfected", "noninfected", "notinfected", "ni", "mock", "mockinfected", "control", "ctrl", "negative"}
)
SPLITS = ("train", "val", "test")
TIFF_SUFFIXES = (".tif", ".tiff")
NUMERIC_COLUMNS = ("infection_onset_hour", "frame_interval_hours", "start_hour")
# Where a stack's frame interval came from (SPEC section 1's precedence), shown by check-data.
FROM_MANIFEST, FROM_FILE, FROM_CONFIG, FROM_COMMAND_LINE = "manifest", "file", "config", "command line"


@dataclass(frozen=True)
class StackRecord:
    """One stack as the manifest describes it. Hours are hours since experiment start."""

    stack_id: str
    path: str
    infected: bool | None  # None: unknown (prediction on unlabelled stacks)
    onset_hour: float | None  # infection onset, hours since start; None for uninfected
    frame_interval_hours: float  # hours between frames, resolved (see interval_source)
    start_hour: float
    split: str | None
    group: str
    extra: dict[str, str] = field(default_factory=dict)
    interval_source: str = FROM_MANIFEST  # FROM_MANIFEST, FROM_FILE, FROM_CONFIG or FROM_COMMAND_LINE
    # each frame's hours since the first frame, where the file records irregular times (OME DeltaT)
    frame_hours: tuple[float, ...] | None = None

    @property
    def condition(self) -> str:
        return "" if self.infected is None else ("infected" if self.infected else "uninfected")


def parse_condition(value: str, where: str) -> bool:
    """True for infected, False for uninfected, whichever of the accepted words (case, spaces and hyphens
    ignored) the sheet uses."""
    word = re.sub(r"[\s_-]+", "", value.lower())
    if word in INFECTED_WORDS:
        return True
    if word in UNINFECTED_WORDS:
        return False
    raise BadInputError(
        f"{where}: unknown condition {value!r} (use infected/inf, or uninfected/mock/control/ctrl/NI/"
        "non-infected/not infected/mock-infected/negative)"
    )


def _float(value: str | None, column: str, where: str, decimal_comma: bool = False) -> float | None:
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    if decimal_comma and re.fullmatch(r"[+-]?\d*,\d+", text):
        text = text.replace(",", ".")  # European spreadsheets: 0,5 in a ;- or tab-separated file
    try:
        out = float(text)
    except ValueError:
        raise BadInputError(f"{where}: column {column!r} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise BadInputError(f"{where}: column {column!r} must be finite, got {value!r}")
    return out


def _record(
    row: dict[str, str],
    where: str,
    base: Path,
    *,
    default_interval: float,
    default_onset: float | None,
    labelled: bool,
    decimal_comma: bool = False,
) -> StackRecord:
    stack_id = (row.get("stack_id") or "").strip()
    if not stack_id:
        raise BadInputError(f"{where}: empty stack_id")
    raw_path = (row.get("path") or "").strip()
    if not raw_path:
        raise BadInputError(f"{where} (stack_id {stack_id}): empty path")
    path = Path(raw_path.replace("\\", "/"))  # a Windows sheet's stacks\A1.tif is stacks/A1.tif here
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise BadInputError(f"{where} (stack_id {stack_id}): file not found: {path}")
    cond = row.get("condition")
    infected = parse_condition(cond, f"{where} (stack_id {stack_id})") if labelled or (cond or "").strip() else None
    number = {c: _float(row.get(c), c, where, decimal_comma) for c in NUMERIC_COLUMNS}
    onset = number["infection_onset_hour"]
    if infected:
        onset = default_onset if onset is None else onset
        if onset is None:
            raise BadInputError(
                f"{where} (stack_id {stack_id}): infected stack has no infection_onset_hour "
                "(fill the column or set multitask.infection_onset_hour)"
            )
    else:
        onset = None
    interval, source = number["frame_interval_hours"], FROM_MANIFEST
    if interval is None:
        interval, source = default_interval, FROM_CONFIG  # the file's own metadata may still say (probe time)
    if interval <= 0:
        raise BadInputError(f"{where}: frame_interval_hours must be > 0, got {interval}")
    start = number["start_hour"] or 0.0
    split = (row.get("split") or "").strip().lower() or None
    if split is not None and split not in SPLITS:
        raise BadInputError(f"{where} (stack_id {stack_id}): unknown split {split!r} (use train, val or test)")
    group = (row.get("group") or "").strip() or stack_id
    extra = {k: (v or "") for k, v in row.items() if k is not None and k not in KNOWN_COLUMNS}
    return StackRecord(stack_id, str(path), infected, onset, float(interval), float(start), split, group, extra,
                       interval_source=source)


def load_manifest(
    path: str | Path,
    *,
    default_interval: float = 1.0,
    default_onset: float | None = 0.0,
    labelled: bool = True,
) -> list[StackRecord]:
    """Parse and validate a manifest CSV. `labelled=False` makes `condition` optional (prediction)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"manifest not found: {path}")
    table = read_table(path)
    required = REQUIRED_COLUMNS if labelled else ("stack_id", "path")
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise BadInputError(
            f"manifest {path}: missing required column(s) {', '.join(missing)} (read as {table.how}; columns "
            f"found: {', '.join(table.columns) or 'none'})"
        )
    records: list[StackRecord] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    defaulted: list[str] = []  # infected rows whose onset cell is empty
    for line, row in table.rows:
        where = f"row {line}"
        try:
            rec = _record(
                row,
                where,
                path.parent,
                default_interval=default_interval,
                default_onset=default_onset,
                labelled=labelled,
                decimal_comma=table.delimiter != ",",
            )
            if rec.stack_id in seen:
                raise BadInputError(f"{where}: duplicate stack_id {rec.stack_id!r} (first on row {seen[rec.stack_id]})")
        except BadInputError as exc:
            errors.append(str(exc))
            continue
        seen[rec.stack_id] = line
        records.append(rec)
        if rec.infected and not (row.get("infection_onset_hour") or "").strip():
            defaulted.append(rec.stack_id)
    if len(errors) == 1:
        raise BadInputError(f"manifest {path} {errors[0]}")
    if errors:  # every bad row in one error, the file named once
        raise all_culprits(errors, f"manifest {path}")
    if not records:
        raise BadInputError(f"manifest {path}: no stacks listed")
    given = sum(1 for r in records if r.infected) - len(defaulted)
    if defaulted and given:  # some rows give an onset, so an empty one is more likely missing than meant
        log.warning("manifest %s: infected stack_id %s %s no infection_onset_hour, unlike %d other infected "
                    "row(s); using multitask.infection_onset_hour (%g h)", path, ", ".join(defaulted),
                    "has" if len(defaulted) == 1 else "have", given, default_onset)
    return records


def records_from_dirs(
    infected_dir: str | Path,
    uninfected_dir: str | Path,
    *,
    default_interval: float = 1.0,
    default_onset: float | None = 0.0,
) -> list[StackRecord]:
    """The two-folder layout many labs have: one TIFF stack per file, stack_id = file stem."""
    records: list[StackRecord] = []
    seen: dict[str, Path] = {}
    for folder, infected in ((Path(infected_dir), True), (Path(uninfected_dir), False)):
        if not folder.is_dir():
            raise BadInputError(f"data folder not found: {folder}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES)
        if not files:
            raise BadInputError(f"no .tif/.tiff stacks in {folder}")
        for f in files:
            if f.stem in seen:
                raise BadInputError(f"duplicate stack_id {f.stem!r}: {seen[f.stem]} and {f}")
            seen[f.stem] = f
            if infected and default_onset is None:
                raise BadInputError(
                    f"infected stack {f} has no onset: set multitask.infection_onset_hour or use a manifest"
                )
            onset = default_onset if infected else None
            records.append(StackRecord(f.stem, str(f.resolve()), infected, onset, default_interval, 0.0, None, f.stem,
                                       interval_source=FROM_CONFIG))
    return records
