"""Read a table the way spreadsheets save it: CSV in UTF-8 (with or without BOM), UTF-16 (Excel's
"Unicode text"), or cp1252 (CSV saved on Windows); separated by `,`, `;` (European Excel) or tab; or an
`.xlsx` workbook (its first sheet).

The manifest and the plate map both go through `read_table`, so a sheet that opens in one opens in the other.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from cellmtl.errors import BadInputError

DELIMITERS = (",", ";", "\t")
XLSX_SUFFIXES = (".xlsx", ".xlsm")
_NAMES = {",": "comma", ";": "semicolon", "\t": "tab"}


@dataclass(frozen=True)
class Table:
    """`rows`: (spreadsheet line number, {column: cell text}) for every non-blank row; cells stripped of
    nothing but the None of short rows. `how`: how it was read, for error messages."""

    columns: list[str]
    rows: list[tuple[int, dict[str, str]]]
    delimiter: str  # "," for xlsx (numbers there are numbers, never decimal commas)
    how: str


def decode(data: bytes, path: Path) -> tuple[str, str]:
    """(text, encoding): a BOM decides (UTF-8, UTF-16); then UTF-8; then cp1252, which Excel on Windows writes."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="strict"), "UTF-8 with BOM"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), "UTF-16"
        except UnicodeDecodeError:
            pass
    elif len(data) >= 4 and data[1:4:2] == b"\x00\x00" and data[0:4:2] != b"\x00\x00":
        try:
            return data.decode("utf-16-le"), "UTF-16 (no BOM)"
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError as exc:
        raise BadInputError(
            f"{path}: cannot decode the text (tried UTF-8, UTF-16 and cp1252; byte {exc.start} is not valid in "
            "any); save it from the spreadsheet as 'CSV UTF-8'"
        ) from None


def sniff_delimiter(text: str) -> str:
    """The separator of the header line (the first non-blank one): whichever of `,` `;` tab it holds most of,
    outside quotes; `,` when it holds none (a one-column table)."""
    header = next((line for line in text.splitlines() if line.strip()), "")
    counts = {}
    for d in DELIMITERS:
        try:
            counts[d] = len(next(csv.reader([header], delimiter=d))) - 1
        except (csv.Error, StopIteration):
            counts[d] = 0
    best = max(DELIMITERS, key=lambda d: counts[d])  # ties go to the earlier: "," first
    return best if counts[best] > 0 else ","


def _rows(records: list[list[str]], first_line: int = 1) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    header_at = next((i for i, r in enumerate(records) if any(c.strip() for c in r)), None)
    if header_at is None:
        return [], []
    columns = [c.strip() for c in records[header_at]]
    rows = []
    for i, rec in enumerate(records[header_at + 1:], start=header_at + 1):
        if not any(c.strip() for c in rec):
            continue  # blank line (or a row of empty cells, as spreadsheets export)
        cells = list(rec) + [""] * (len(columns) - len(rec))
        rows.append((first_line + i, {c: cells[k] for k, c in enumerate(columns) if c}))
    return columns, rows


def _read_text(path: Path) -> Table:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    text, encoding = decode(data, path)
    delimiter = sniff_delimiter(text)
    try:
        records = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error as exc:
        raise BadInputError(
            f"{path}: not a readable table ({encoding}, {_NAMES[delimiter]}-separated): {exc}"
        ) from None
    columns, rows = _rows(records)
    return Table(columns, rows, delimiter, f"{encoding}, {_NAMES[delimiter]}-separated")


def _cell(value: object) -> str:
    """An xlsx cell as the text a CSV of it would hold: 2.0 -> '2', None -> ''."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _read_xlsx(path: Path) -> Table:
    try:
        import openpyxl
    except ImportError:  # a declared dependency; only a broken install lacks it
        raise BadInputError(f"{path}: reading .xlsx needs openpyxl (pip install openpyxl)") from None
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: one line naming it
        raise BadInputError(f"{path}: cannot read the workbook ({exc.__class__.__name__}: {exc})") from None
    try:
        sheet = book.worksheets[0]
        records = [[_cell(v) for v in row] for row in sheet.iter_rows(values_only=True)]
        title = sheet.title
    finally:
        book.close()
    columns, rows = _rows(records)
    return Table(columns, rows, ",", f"xlsx, first sheet {title!r}")


def read_table(path: str | Path) -> Table:
    """Read a CSV/TSV or .xlsx table; every failure is a BadInputError naming the file and what was tried."""
    path = Path(path)
    return _read_xlsx(path) if path.suffix.lower() in XLSX_SUFFIXES else _read_text(path)
