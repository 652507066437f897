"""`cellmtl manifest`: a manifest from a plate imager's per-image files and a plate map.

Plate imagers export one file per well, field, channel and time point, with those in the file name.
A PATTERN names the parts (`{plate}`, `{well}` or `{row}`+`{col}`, `{field}`, `{channel}`, `{time}`,
`{plane}`, `{*}` for text to ignore); every file becomes one slot (stack, time point, channel, plane) and
every plate + well + field one stack, written as a frame list (`cellmtl.data.readers.write_frame_list`) that the
readers open lazily. The plate map (one row per well) adds the condition, onset and any other columns.
Every problem (a file no pattern matches, a missing channel or time point, a well the map lacks, two files
for one slot) is collected and reported in one error; nothing is written then.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cellmtl.data.filemeta import ngff_attrs, ngff_plate_images
from cellmtl.data.manifest import parse_condition
from cellmtl.data.readers import (
    FRAME_LIST_SUFFIX,
    SUPPORTED_IMAGE_SUFFIXES,
    is_zarr_group,
    natural_key,
    open_zarr_group,
    write_frame_list,
)
from cellmtl.data.table import read_table
from cellmtl.errors import BadInputError, all_culprits
from cellmtl.fileio import csv_text, write_text

# What each placeholder may match; literal text around them anchors the non-greedy ones. Only {plate} (and {*})
# may hold underscores: plate and experiment names often do, the other parts never in the exporters' names.
PLACEHOLDERS = {
    "plate": r"[^/]+?",
    "well": r"[A-Za-z]{1,2}\d{1,3}",
    "row": r"[A-Za-z]{1,2}|\d{1,3}",
    "col": r"\d{1,3}",
    "field": r"[^/_]+?",
    "channel": r"[^/_]+?",
    "time": r"[^/_]+?",
    "plane": r"[^/_]+?",
    "*": r"[^/]*?",
}

# The exporters' documented file names (docs/VALIDATION.md, "Where the plate presets come from", says where each
# form comes from).
PRESETS = {
    # Incucyte "Export Images": <vessel>_<channel>_<well>_<image>_<elapsed ddDhhHmmM>, e.g.
    # VID1957_phase_E11_5_06d12h05m.tif
    "incucyte": "{plate}_{channel}_{well}_{field}_{time}.tif",
    # MetaXpress (ImageXpress): TimePoint_<n>/<plate>_<well>_s<site>_w<wavelength><id>.TIF, e.g.
    # TimePoint_1/P1_B02_s1_w1A2B3.TIF (thumbnails <...>_thumb<id>.TIF are not images of the plate)
    "imagexpress": "TimePoint_{time}/{plate}_{well}_s{field}_w{channel}{*}.tif",
    # Harmony (Operetta, Opera Phenix): Images/r<row>c<col>f<field>p<plane>-ch<channel>sk<timepoint>fk1fl1.tiff
    "operetta": "r{row}c{col}f{field}p{plane}-ch{channel}sk{time}fk{*}fl{*}.tiff",
    # Yokogawa CellVoyager (CV7000/CV8000): <name>_<well>_T<t>F<field>L<l>A<a>Z<z>C<channel>.tif
    "cellvoyager": "{plate}_{well}_T{time}F{field}L{*}A{*}Z{plane}C{channel}.tif",
}
IGNORED_NAMES = re.compile(r"_thumb", re.IGNORECASE)  # MetaXpress thumbnails beside the images
_TIME = re.compile(
    r"(?:(?P<d>\d+(?:\.\d+)?)d)?(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m(?:in)?)?(?:(?P<s>\d+(?:\.\d+)?)s)?"
)
_WELL = re.compile(r"([A-Za-z]{1,2})0*(\d{1,3})")


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """PATTERN -> regex over the file's path relative to --images ('/'-separated), case-insensitive."""
    names = re.findall(r"\{([^}]*)\}", pattern)
    unknown = [n for n in names if n not in PLACEHOLDERS]
    if unknown:
        raise BadInputError(f"--pattern {pattern!r}: unknown part {{{unknown[0]}}}; use "
                            + ", ".join(f"{{{n}}}" for n in PLACEHOLDERS))
    repeated = [n for n in set(names) if n != "*" and names.count(n) > 1]
    if repeated:
        raise BadInputError(f"--pattern {pattern!r}: {{{repeated[0]}}} appears twice")
    if "well" not in names and not {"row", "col"} <= set(names):
        raise BadInputError(f"--pattern {pattern!r} needs {{well}} (or {{row}} and {{col}})")
    if "time" not in names:
        raise BadInputError(f"--pattern {pattern!r} needs {{time}}: each file is one time point")
    out, pos = [], 0
    for m in re.finditer(r"\{([^}]*)\}", pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        name = m.group(1)
        out.append(f"(?:{PLACEHOLDERS[name]})" if name == "*" else f"(?P<{name}>{PLACEHOLDERS[name]})")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out), re.IGNORECASE)


def well_name(text: str) -> str | None:
    """`B2`, `B02`, `b2` -> `B2`; None for what is not a well name."""
    m = _WELL.fullmatch(text.strip())
    return None if m is None else f"{m.group(1).upper()}{int(m.group(2))}"


def row_letters(row: str) -> str:
    """A plate row as letters: `B` -> `B`, `2` -> `B`, `27` -> `AA` (1536-well plates)."""
    if row.isalpha():
        return row.upper()
    n, out = int(row), ""
    while n > 0:
        n, r = divmod(n - 1, 26)
        out = chr(ord("A") + r) + out
    return out


def time_hours(token: str) -> float | None:
    """Elapsed time in a file name -> hours: `00d12h30m`, `12h`, `12.5h`, `90min`, `45m`, `30s`; None when the
    token is a plain index (`t012`, `012`, `5`) or not a time at all."""
    m = _TIME.fullmatch(token.strip().lower())
    if m is None or not any(m.groupdict().values()):
        return None
    parts = {k: float(v) if v else 0.0 for k, v in m.groupdict().items()}
    return parts["d"] * 24 + parts["h"] + parts["m"] / 60 + parts["s"] / 3600


def _number_text(text: str) -> str:
    """`01` -> `1` (fields are counted, not spelt); other text as it is."""
    return str(int(text)) if text.isdigit() else text


def time_index(token: str) -> int | None:
    m = re.fullmatch(r"[tT]?(\d+)", token.strip())
    return None if m is None else int(m.group(1))


@dataclass
class Slot:
    """What one file name says."""

    file: Path
    plate: str
    well: str
    field: str
    channel: str
    time: str  # the raw token
    plane: str


@dataclass
class PlateStack:
    """One plate + well + field: its frames, in time order, each a list of channel files (each a list of planes)."""

    plate: str
    well: str
    field: str
    hours: list[float] = field(default_factory=list)
    files: list[list[list[Path]]] = field(default_factory=list)

    @property
    def stack_id(self) -> str:
        return "_".join(p for p in (self.plate, self.well, self.field) if p)

    @property
    def group(self) -> str:
        return "_".join(p for p in (self.plate, self.well) if p)


def image_files(root: Path) -> list[Path]:
    """Every image file under `root` (recursive, hidden files and thumbnails skipped), natural-sorted."""
    if not root.is_dir():
        raise BadInputError(f"--images {root}: no such folder")
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_IMAGE_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(root).parts)
             and not IGNORED_NAMES.search(p.name)]
    return sorted(files, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def parse_names(root: Path, files: Sequence[Path], regex: re.Pattern[str]) -> tuple[list[Slot], list[str]]:
    """(slots, problems): every file's parts, or a problem naming the file that matches no pattern."""
    slots, problems = [], []
    for f in files:
        rel = f.relative_to(root).as_posix()
        m = regex.fullmatch(rel) or regex.fullmatch(f.name)  # patterns may or may not name the folders
        if m is None:
            problems.append(f"{rel} matches no pattern")
            continue
        parts = m.groupdict()
        well = well_name(parts["well"]) if parts.get("well") else None
        if well is None and parts.get("row") and parts.get("col"):
            well = f"{row_letters(parts['row'])}{int(parts['col'])}"
        if well is None:
            problems.append(f"{rel}: {parts.get('well')!r} is not a well name (e.g. B2)")
            continue
        slots.append(Slot(f, parts.get("plate") or "", well, _number_text(parts.get("field") or ""),
                          parts.get("channel") or "", parts["time"], parts.get("plane") or ""))
    return slots, problems


def slot_hours(slots: Sequence[Slot], interval_hours: float | None) -> tuple[dict[str, float], list[str]]:
    """Hours since start for every distinct time token: elapsed-time tokens as they say; frame indices
    (`t012`) times --interval-hours, counted from the first index."""
    tokens = sorted({s.time for s in slots}, key=natural_key)
    out, problems, index = {}, [], {}
    for tok in tokens:
        hours = time_hours(tok)
        if hours is not None and time_index(tok) is None:
            out[tok] = hours
        elif time_index(tok) is not None:
            index[tok] = time_index(tok)
        else:
            problems.append(f"time {tok!r} (in {next(s.file.name for s in slots if s.time == tok)}) is neither an "
                            "elapsed time (00d12h30m, 12h, 12.5h, 90min) nor a frame index (t012)")
    if index:
        if interval_hours is None:
            problems.append(f"times such as {next(iter(index))!r} are frame indices; give --interval-hours H")
        else:
            first = min(index.values())
            out.update({tok: (i - first) * interval_hours for tok, i in index.items()})
    return out, problems


def _channel_order(slots: Sequence[Slot], wanted: Sequence[str] | None) -> tuple[list[str], list[str]]:
    found = sorted({s.channel for s in slots}, key=natural_key)
    if not wanted:
        return found, []
    lower = {c.lower(): c for c in found}
    missing = [c for c in wanted if c.lower() not in lower]
    problems = [f"--channels {c!r} is in no file name (channels found: {', '.join(found) or 'none'})" for c in missing]
    return [lower.get(c.lower(), c) for c in wanted], problems


def build_stacks(
    slots: Sequence[Slot], channels: Sequence[str], hours: dict[str, float]
) -> tuple[list[PlateStack], list[str]]:
    """Group slots into stacks; every stack needs every channel (and the same planes) at every time point its
    plate has, and no slot may hold two files."""
    by_slot: dict[tuple[str, str, str, float, str, str], list[Path]] = {}
    for s in slots:
        if s.channel in channels and s.time in hours:
            by_slot.setdefault((s.plate, s.well, s.field, hours[s.time], s.channel, s.plane), []).append(s.file)
    problems = [f"two files for one image (plate {k[0] or '-'}, well {k[1]}, field {k[2] or '-'}, {k[3]:g} h, channel "
                f"{k[4]}{', plane ' + k[5] if k[5] else ''}): {', '.join(f.name for f in v)}"
                for k, v in by_slot.items() if len(v) > 1]
    plate_times: dict[str, set[float]] = {}
    planes = sorted({k[5] for k in by_slot}, key=natural_key)
    stacks: dict[tuple[str, str, str], PlateStack] = {}
    for plate, well, fld, h, _, _ in by_slot:
        plate_times.setdefault(plate, set()).add(h)
        stacks.setdefault((plate, well, fld), PlateStack(plate, well, fld))
    for key, st in sorted(stacks.items(), key=lambda kv: [natural_key(p) for p in kv[0]]):
        gaps = []  # one problem per stack, however many images it lacks
        for h in sorted(plate_times[key[0]]):
            frame = [[by_slot.get((*key, h, c, p), [None])[0] for p in planes] for c in channels]
            lacking = [c for c, files in zip(channels, frame, strict=True) if any(f is None for f in files)]
            if lacking:
                gaps.append(f"{'/'.join(lacking)} at {h:g} h")
                continue
            st.hours.append(h)
            st.files.append(frame)
        if gaps:
            problems.append(f"stack {st.stack_id} lacks images ({len(gaps)} time point(s) of its plate): "
                            f"{', '.join(gaps[:4])}{' ...' if len(gaps) > 4 else ''}")
    return list(stacks.values()), problems


@dataclass(frozen=True)
class PlateMap:
    columns: list[str]  # the other columns, in the map's order
    rows: dict[tuple[str, str], dict[str, str]]  # (plate or "", well) -> cells
    by_plate: bool  # rows are keyed by plate and well (the map has a plate column and the names a {plate})


def read_plate_map(path: Path, plates_in_names: bool) -> PlateMap:
    table = read_table(path)
    if "well" not in table.columns:
        raise BadInputError(f"plate map {path}: no 'well' column (columns found: {', '.join(table.columns)})")
    by_plate = plates_in_names and "plate" in table.columns
    rows: dict[tuple[str, str], dict[str, str]] = {}
    problems = []
    for line, row in table.rows:
        well = well_name(row.get("well", ""))
        if well is None:
            problems.append(f"row {line}: {row.get('well', '')!r} is not a well name (e.g. B2)")
            continue
        key = ((row.get("plate") or "").strip() if by_plate else "", well)
        if key in rows:
            problems.append(f"row {line}: well {well}{' of plate ' + key[0] if key[0] else ''} is listed twice")
            continue
        cond = (row.get("condition") or "").strip()
        if cond:
            try:
                parse_condition(cond, f"row {line} (well {well})")
            except BadInputError as exc:
                problems.append(str(exc))
        rows[key] = {c: (v or "").strip() for c, v in row.items() if c != "well"}
    if problems:
        raise all_culprits(problems, f"plate map {path}")
    return PlateMap([c for c in table.columns if c and c != "well"], rows, by_plate)


MANIFEST_COLUMNS = ("stack_id", "path", "condition", "infection_onset_hour", "start_hour", "group", "plate", "well",
                    "field", "channels")


def manifest_rows(stacks: Sequence[PlateStack], plate_map: PlateMap, list_dir: Path, out_dir: Path,
                  channels: Sequence[str]) -> tuple[list[dict[str, str]], list[str]]:
    rows, problems = [], []
    for st in stacks:
        info = plate_map.rows.get((st.plate if plate_map.by_plate else "", st.well))
        if info is None:
            problems.append(f"well {st.well}{' of plate ' + st.plate if st.plate else ''} (stack {st.stack_id}) has "
                            "no row in the plate map")
            continue
        path = list_dir / f"{st.stack_id}{FRAME_LIST_SUFFIX}"
        row = {"stack_id": st.stack_id, "path": os.path.relpath(path, out_dir), "start_hour": f"{st.hours[0]:g}",
               "group": st.group, "plate": st.plate or info.get("plate", ""), "well": st.well, "field": st.field,
               "channels": "|".join(channels)}
        row.update({c: v for c, v in info.items() if c != "plate" or not row["plate"]})  # names' plate wins
        rows.append(row)
    return rows, problems


def ngff_plate(images: Path) -> list[tuple[str, str, str]] | None:
    """(well, field, image path) of every image when `images` is an OME-Zarr HCS plate, else None."""
    if not is_zarr_group(images):
        return None
    group = open_zarr_group(images)
    attrs = group.attrs.asdict()
    if "plate" not in ngff_attrs(attrs)[0]:
        return None
    wells = {}
    for w in ngff_attrs(attrs)[0]["plate"].get("wells") or []:
        wells[str(w.get("path"))] = open_zarr_group(images / str(w.get("path"))).attrs.asdict()
    return ngff_plate_images(attrs, wells)


def plate_rows(images: Path, plate_map_path: Path, out: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Manifest rows for an OME-Zarr HCS plate: one stack per well and field; the plate's name is the folder's."""
    name = images.name.split(".")[0]
    plate_map = read_plate_map(plate_map_path, plates_in_names=False)
    rows, problems = [], []
    for well, fld, rel in ngff_plate(images) or []:
        info = plate_map.rows.get(("", well_name(well) or well))
        if info is None:
            problems.append(f"well {well} (image {rel}) has no row in the plate map")
            continue
        row = {"stack_id": f"{name}_{well}_{fld}", "path": os.path.relpath(images / rel, out.parent),
               "group": f"{name}_{well}", "plate": name, "well": well_name(well) or well, "field": fld}
        row.update({c: v for c, v in info.items() if c != "plate"})
        rows.append(row)
    if not rows and not problems:
        problems.append(f"OME-Zarr plate {images} lists no images")
    return rows, problems


@dataclass(frozen=True)
class ManifestSummary:
    """What `write_manifest` wrote (or would write): the manifest text and what the command prints."""

    text: str
    n_stacks: int
    n_wells: int
    frames: tuple[int, int] | None  # fewest and most frames per stack (None: the images keep their own)
    channels: list[str]  # the order of the frame lists' channels (empty: the images name their own)


def write_manifest(
    images: Path,
    pattern: str | None,
    plate_map_path: Path,
    out: Path,
    *,
    channels: Sequence[str] | None = None,
    interval_hours: float | None = None,
    dry_run: bool = False,
) -> ManifestSummary:
    """Writes `out` and one frame list per stack in `<out stem>.stacks/`
    unless `dry_run`; raises one BadInputError naming every problem, writing nothing. An OME-Zarr HCS plate needs
    no pattern: its wells and fields are read from its metadata."""
    out = out.resolve()
    if ngff_plate(images.resolve()) is not None:
        return _write_plate_manifest(images.resolve(), plate_map_path, out, dry_run)
    if pattern is None:
        raise BadInputError("manifest needs --pattern PATTERN or --preset NAME for per-image files")
    regex = compile_pattern(pattern)
    root = images.resolve()
    files = image_files(root)
    if not files:
        raise BadInputError(f"--images {images}: no image files ({', '.join(SUPPORTED_IMAGE_SUFFIXES)})")
    slots, problems = parse_names(root, files, regex)
    hours, time_problems = slot_hours(slots, interval_hours)
    order, channel_problems = _channel_order(slots, channels)
    stacks, stack_problems = build_stacks(slots, order, hours)
    plate_map = read_plate_map(plate_map_path, plates_in_names="plate" in regex.groupindex)
    list_dir = out.parent / f"{out.stem}.stacks"
    rows, map_problems = manifest_rows(stacks, plate_map, list_dir, out.parent, order)
    problems += time_problems + channel_problems + map_problems + stack_problems
    if problems:
        raise all_culprits(problems, f"cellmtl manifest (--images {images}, --pattern {pattern!r})")
    columns = list(MANIFEST_COLUMNS) + [c for c in plate_map.columns if c not in MANIFEST_COLUMNS]
    text = csv_text(rows, columns)
    if not dry_run:
        list_dir.mkdir(parents=True, exist_ok=True)
        for st in stacks:
            write_frame_list(list_dir / f"{st.stack_id}{FRAME_LIST_SUFFIX}", order, st.hours, st.files)
        write_text(out, text)
    n_frames = [len(st.hours) for st in stacks]
    return ManifestSummary(text, len(stacks), len({(st.plate, st.well) for st in stacks}),
                           (min(n_frames), max(n_frames)), order)


def _write_plate_manifest(images: Path, plate_map_path: Path, out: Path, dry_run: bool) -> ManifestSummary:
    rows, problems = plate_rows(images, plate_map_path, out)
    if problems:
        raise all_culprits(problems, f"cellmtl manifest (--images {images})")
    columns = list(dict.fromkeys([*MANIFEST_COLUMNS, *(c for r in rows for c in r)]))
    columns.remove("channels")  # the images name their channels (omero labels)
    text = csv_text(rows, columns)
    if not dry_run:
        write_text(out, text)
    return ManifestSummary(text, len(rows), len({r["well"] for r in rows}), None, [])
