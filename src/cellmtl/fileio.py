"""Atomic writes for every file cellmtl produces: a temp file in the same folder, then a rename over the
target, so a crash (or a bad input found half-way) leaves either the old complete file or the new one,
never a torn file, and an earlier result is never destroyed by a run that fails.

Files get the user's umask (a plain `open`, unlike `tempfile.mkstemp`'s 0600), so colleagues on shared
storage can read a run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import yaml


def fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def temp_path(path: Path) -> Path:
    """Where `atomic_write` stages `path`: hidden, in the same folder (a rename across folders is not atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], *, durable: bool = False) -> Path:
    """Stage with `write(binary file)`, then rename over `path`. `durable` also fsyncs the data and the folder
    (checkpoints: the file must survive a power cut, not just a crash of this process)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _json_safe(value: Any) -> Any:
    """NaN/Inf (undefined metrics that slipped through as floats) -> null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, obj: Any, **kwargs: Any) -> Path:
    return write_text(path, json.dumps(_json_safe(obj), indent=2, allow_nan=False, **kwargs) + "\n")


def write_yaml(path: str | Path, obj: Any) -> Path:
    return write_text(path, yaml.safe_dump(obj, sort_keys=False))


def csv_cell(value: Any) -> Any:
    """A table cell: None and NaN (missing, in memory) become an empty cell on disk."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """One row per mapping; columns in first-seen order unless given; missing values as empty cells."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r)) if rows else []
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)
    return write_text(path, buf.getvalue())


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The text `write_csv` would write (for --dry-run style previews)."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)
    return buf.getvalue()


def file_stem(stack_id: str) -> str:
    """A file name for a stack: the stack_id where it is a safe name already, else its safe characters plus a
    short hash of the stack_id, so `Well ä` and `Well ö` (both `Well_`) get two files, not one."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stack_id).strip(".") or "stack"
    if safe == stack_id:
        return safe
    return f"{safe}-{hashlib.sha1(stack_id.encode('utf-8')).hexdigest()[:8]}"
