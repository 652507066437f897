"""The manifest (SPEC section 3): one row per stack, validated into `StackRecord`s.

Every problem is a `BadInputError` naming the manifest file, the row (as a spreadsheet line number)
and the column or value at fault.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from cellmtl.errors import BadInputError

REQUIRED_COLUMNS = ("stack_id", "path", "condition")
KNOWN_COLUMNS = REQUIRED_COLUMNS + (
    "infection_onset_hour",
    "frame_interval_hours",
    "start_hour",
    "split",
    "group",
)
INFECTED_WORDS = frozenset({"infected"})
UNINFECTED_WORDS = frozenset({"uninfected", "mock", "control"})
SPLITS = ("train", "val", "test")
TIFF_SUFFIXES = (".tif", ".tiff")


@dataclass(frozen=True)
class StackRecord:
    """One stack as the manifest describes it. Hours are hours since experiment start."""

    stack_id: str
    path: str
    infected: bool | None  # None: unknown (prediction on unlabelled stacks)
    onset_hour: float | None  # infection onset, hours since start; None for uninfected
    frame_interval_hours: float
    start_hour: float
    split: str | None
    group: str
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def condition(self) -> str:
        return "" if self.infected is None else ("infected" if self.infected else "uninfected")


def parse_condition(value: str, where: str) -> bool:
    word = value.strip().lower()
    if word in INFECTED_WORDS:
        return True
    if word in UNINFECTED_WORDS:
        return False
    raise BadInputError(
        f"{where}: unknown condition {value!r} (use infected, or uninfected/mock/control)"
    )


def _float(value: str | None, column: str, where: str) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        out = float(value)
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
) -> StackRecord:
    stack_id = (row.get("stack_id") or "").strip()
    if not stack_id:
        raise BadInputError(f"{where}: empty stack_id")
    raw_path = (row.get("path") or "").strip()
    if not raw_path:
        raise BadInputError(f"{where} (stack_id {stack_id}): empty path")
    path = Path(raw_path)
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise BadInputError(f"{where} (stack_id {stack_id}): file not found: {path}")
    cond = row.get("condition")
    infected = parse_condition(cond, f"{where} (stack_id {stack_id})") if labelled or (cond or "").strip() else None
    onset = _float(row.get("infection_onset_hour"), "infection_onset_hour", where)
    if infected:
        onset = default_onset if onset is None else onset
        if onset is None:
            raise BadInputError(
                f"{where} (stack_id {stack_id}): infected stack has no infection_onset_hour "
                "(fill the column or set multitask.infection_onset_hour)"
            )
    else:
        onset = None
    interval = _float(row.get("frame_interval_hours"), "frame_interval_hours", where) or default_interval
    if interval <= 0:
        raise BadInputError(f"{where}: frame_interval_hours must be > 0, got {interval}")
    start = _float(row.get("start_hour"), "start_hour", where) or 0.0
    split = (row.get("split") or "").strip().lower() or None
    if split is not None and split not in SPLITS:
        raise BadInputError(f"{where} (stack_id {stack_id}): unknown split {split!r} (use train, val or test)")
    group = (row.get("group") or "").strip() or stack_id
    extra = {k: (v or "") for k, v in row.items() if k is not None and k not in KNOWN_COLUMNS}
    return StackRecord(stack_id, str(path), infected, onset, float(interval), float(start), split, group, extra)


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
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        required = REQUIRED_COLUMNS if labelled else ("stack_id", "path")
        missing = [c for c in required if c not in columns]
        if missing:
            raise BadInputError(f"manifest {path}: missing required column(s) {', '.join(missing)}")
        reader.fieldnames = columns
        records: list[StackRecord] = []
        seen: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # blank line
            where = f"manifest {path} row {line}"
            rec = _record(
                row,
                where,
                path.parent,
                default_interval=default_interval,
                default_onset=default_onset,
                labelled=labelled,
            )
            if rec.stack_id in seen:
                raise BadInputError(f"{where}: duplicate stack_id {rec.stack_id!r} (first on row {seen[rec.stack_id]})")
            seen[rec.stack_id] = line
            records.append(rec)
    if not records:
        raise BadInputError(f"manifest {path}: no stacks listed")
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
            records.append(StackRecord(f.stem, str(f.resolve()), infected, onset, default_interval, 0.0, None, f.stem))
    return records
