"""The config reference, rendered from the schema: `docs/CONFIG.md` and `configs/multitask_example.yaml`.

The meaning of every key lives in one place, the `description=` of its field in `cellmtl.config`; this
module only renders it, and tests/test_config_docs.py fails when the committed files differ from what it
renders. After editing the schema, regenerate from the repository root:

    python -m cellmtl.config_docs --write   # rewrite both files
    python -m cellmtl.config_docs --check   # exit 1 when either is out of date
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cellmtl.config import Config
from cellmtl.fileio import write_text

WIDTH = 110  # the YAML's comment lines, indentation included
MARKDOWN_PATH = "docs/CONFIG.md"
YAML_PATH = "configs/multitask_example.yaml"
REGENERATE = "python -m cellmtl.config_docs --write"

# The example's only value that is not the schema's default: a config needs a data source, and the SPEC's
# example points at the demo's manifest (the user replaces it with their own).
EXAMPLE_VALUES: dict[str, Any] = {"data.manifest": "data/demo/manifest.csv"}

YAML_HEADER = f"""\
# cellmtl: every config key at its default, with what it means. Copy it, point data.manifest at your
# experiment (the only value here that is not a default), delete what you do not change, train with
#   cellmtl train --config my_config.yaml
# Any key can be overridden on the command line:  --set training.epochs=3 --set data.channels=[0,2]
# Unknown or misplaced keys are errors (exit 2), so a typo never silently falls back to a default.
#
# Generated from the schema (src/cellmtl/config.py) by `{REGENERATE}`:
# edit the descriptions there, not here. The same reference as tables: docs/CONFIG.md.

"""

MARKDOWN_INTRO = f"""\
# Config reference

<!-- Generated from src/cellmtl/config.py by `{REGENERATE}`; edit the descriptions there. -->

A config is a YAML file of the sections below; every key is optional except a data source (`data.manifest`,
or `data.infected_dir` + `data.uninfected_dir`). It is validated when it is loaded: an unknown key, a wrong
type or an impossible value is an error (exit 2) that names the key. Any key can be set from the command
line, e.g. `--set training.epochs=3 --set data.channels=[0,2]`, and the resolved config is saved in every run
folder (`config.yaml`) and checkpoint. `configs/multitask_example.yaml` lists every key at its default, with
these descriptions as comments. Times are in hours, sizes in pixels; `null` is YAML's empty value.
"""


@dataclass(frozen=True)
class Section:
    """One model in the schema: `path` its dotted place (`()` = the top level), `fields` its leaf keys."""

    path: tuple[str, ...]
    model: type[BaseModel]
    description: str
    fields: tuple[tuple[str, FieldInfo], ...]


def section_model(field: FieldInfo) -> type[BaseModel] | None:
    """The model of a nested section, None for a leaf key."""
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def sections(model: type[BaseModel] = Config, path: tuple[str, ...] = (), description: str = "") -> Iterator[Section]:
    """Every section of the schema, depth first in field order (the order of the YAML)."""
    leaves = tuple((k, f) for k, f in model.model_fields.items() if section_model(f) is None)
    yield Section(path, model, description, leaves)
    for name, field in model.model_fields.items():
        sub = section_model(field)
        if sub is not None:
            yield from sections(sub, (*path, name), field.description or "")


def all_fields(model: type[BaseModel] = Config) -> Iterator[tuple[str, FieldInfo]]:
    """(dotted key, field) for every field, sections included: what must carry a description."""
    for s in sections(model):
        for name, field in s.model.model_fields.items():
            yield ".".join((*s.path, name)), field


def default_value(field: FieldInfo) -> Any:
    """The field's default as YAML writes it (paths as strings, tuples as lists)."""
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def yaml_value(value: Any) -> str:
    """One value in YAML flow style: `null`, `true`, `[1.0, 99.8]`, `{stride: 1, ...}`."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("...").strip()


def _bounds(field: FieldInfo) -> str:
    """` in (0.0, 1.0)`, ` >= 1`: the Field's ge/gt/le/lt (annotated_types objects in `field.metadata`)."""
    lo = hi = ""
    for m in field.metadata:
        if getattr(m, "ge", None) is not None:
            lo = f"[{m.ge}"
        elif getattr(m, "gt", None) is not None:
            lo = f"({m.gt}"
        elif getattr(m, "le", None) is not None:
            hi = f"{m.le}]"
        elif getattr(m, "lt", None) is not None:
            hi = f"{m.lt})"
    if lo and hi:
        return f" in {lo}, {hi}"
    if lo:
        return (" >= " if lo[0] == "[" else " > ") + lo[1:]
    if hi:
        return (" <= " if hi[-1] == "]" else " < ") + hi[:-1]
    return ""


def _type_name(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if ann is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if ann is Path:
        return "path"
    return getattr(ann, "__name__", str(ann))


def type_text(field: FieldInfo) -> str:
    """`int >= 1 or null`, `float in (0.0, 1.0)`, `drop | keep | as_uninfected`: the type and its bounds."""
    text, bounds = _type_name(field.annotation), _bounds(field)
    if not bounds:
        return text
    for numeric in ("float", "int"):  # the bounds belong to the number, not to `or null`
        if text == numeric or text.startswith(numeric + " "):
            return numeric + bounds + text[len(numeric):]
    return text + bounds


def _cell(text: str) -> str:
    """Text for a Markdown table cell: `|` would end the cell, `\\` and `*` would be read as markup."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")


def _row(key: str, field: FieldInfo) -> str:
    default = yaml_value(default_value(field)).replace("|", "\\|")  # in a code span only `|` needs escaping
    return f"| `{key}` | {_cell(type_text(field))} | `{default}` | {_cell(field.description or '')} |"


def render_markdown() -> str:
    """docs/CONFIG.md: one table per section (key, type, default, description)."""
    out = [MARKDOWN_INTRO]
    for s in sections():
        title = "`" + ".".join(s.path) + "`" if s.path else "Top level"
        out.append(f"{'#' * (max(len(s.path), 1) + 1)} {title}\n")  # top level and data: ##, data.frames: ###
        if s.description:
            out.append(_cell(s.description[0].upper() + s.description[1:]) + ".\n")
        if not s.fields:
            continue
        rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        rows += [_row(".".join((*s.path, name)), field) for name, field in s.fields]
        out.append("\n".join(rows) + "\n")
    return "\n".join(out)


def _comment(text: str, indent: int) -> list[str]:
    pad = " " * indent + "# "
    return textwrap.wrap(text, width=WIDTH, initial_indent=pad, subsequent_indent=pad, break_long_words=False,
                         break_on_hyphens=False)


def _yaml_section(model: type[BaseModel], path: tuple[str, ...], seen: set[type[BaseModel]]) -> list[str]:
    indent = 2 * len(path)
    lines: list[str] = []
    seen.add(model)
    for name, field in model.model_fields.items():
        key = ".".join((*path, name))
        sub = section_model(field)
        if sub is not None and not path:
            lines.append("")  # a blank line before each top-level section
        lines += _comment(field.description or "", indent)
        if sub is None:
            lines.append(f"{' ' * indent}{name}: {yaml_value(EXAMPLE_VALUES.get(key, default_value(field)))}")
        elif sub in seen:  # a model already spelt out above (data.frames.val, .test): its keys on one line
            lines[-1] += " (keys as above)"
            lines.append(f"{' ' * indent}{name}: {yaml_value(default_value(field))}")
        else:
            lines.append(f"{' ' * indent}{name}:")
            lines += _yaml_section(sub, (*path, name), seen)
    return lines


def render_yaml() -> str:
    """configs/multitask_example.yaml: every key at its default (data.manifest: a placeholder), described."""
    return YAML_HEADER + "\n".join(_yaml_section(Config, (), set())) + "\n"


TARGETS: dict[str, Callable[[], str]] = {MARKDOWN_PATH: render_markdown, YAML_PATH: render_yaml}


def stale_files(root: Path) -> list[str]:
    """The targets under `root` whose text differs from what the schema renders (missing ones included)."""
    stale = []
    for rel, render in TARGETS.items():
        path = root / rel
        if not path.is_file() or path.read_text(encoding="utf-8") != render():
            stale.append(rel)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cellmtl.config_docs", description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help=f"rewrite {' and '.join(TARGETS)}")
    action.add_argument("--check", action="store_true", help="exit 1 when a file is out of date")
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository root (default: .)")
    args = parser.parse_args(argv)
    if not all((args.root / rel).parent.is_dir() for rel in TARGETS):
        print(f"error: {args.root.resolve()} is not the repository root (no configs/ and docs/); give --root",
              file=sys.stderr)
        return 2
    stale = stale_files(args.root)
    if args.check:
        for rel in stale:
            print(f"{rel} is out of date: run {REGENERATE}", file=sys.stderr)
        return 1 if stale else 0
    for rel in stale:
        write_text(args.root / rel, TARGETS[rel]())
        print(f"wrote {rel}")
    if not stale:
        print("up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
