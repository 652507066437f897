"""The config reference is generated from the schema: every key described, the committed files current."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cellmtl import config_docs
from cellmtl.config import Config, DataConfig, MultitaskConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / config_docs.YAML_PATH
REFERENCE = ROOT / config_docs.MARKDOWN_PATH


def dotted_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= dotted_keys(v, prefix + k + ".")
    return out


def leaf_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= leaf_keys(v, prefix + k + ".") if isinstance(v, dict) else {prefix + k}
    return out


def test_every_field_has_a_description():
    fields = dict(config_docs.all_fields())
    assert len(fields) > 80  # sections and leaves of every model, data.frames' three splits included
    missing = sorted(k for k, f in fields.items() if not (f.description or "").strip())
    assert not missing, f"fields without description=: {missing}"


def test_committed_files_are_what_the_schema_renders():
    stale = config_docs.stale_files(ROOT)
    assert not stale, f"{stale} differ from the schema: run {config_docs.REGENERATE} and commit the result"


def test_example_yaml_is_every_key_at_its_default():
    raw = yaml.safe_load(EXAMPLE.read_text())
    cfg = config_from_dict(raw, str(EXAMPLE))
    # the only value that is not the schema's default: a config needs a data source
    assert cfg == config_from_dict({"data": {"manifest": raw["data"]["manifest"]}})
    assert raw["data"]["manifest"] == config_docs.EXAMPLE_VALUES["data.manifest"]
    assert dotted_keys(raw) == dotted_keys(cfg.model_dump(mode="json"))
    # the manifest's alternative is named, so a user finds it
    assert "infected_dir + uninfected_dir" in EXAMPLE.read_text()


def test_example_yaml_loads_from_its_file():
    cfg = load_config(EXAMPLE)
    assert cfg.data.manifest is not None and cfg.data.manifest.name == "manifest.csv"
    assert cfg.training.select_metric == "cls_auc" and cfg.model.head_hidden == 256  # resolved as from defaults


def test_example_yaml_comments_are_wrapped():
    long = [ln for ln in EXAMPLE.read_text().splitlines() if len(ln) > config_docs.WIDTH]
    assert not long


def test_reference_has_a_row_for_every_key():
    text = REFERENCE.read_text()
    cfg = config_from_dict({"data": {"manifest": "m.csv"}})
    for key in leaf_keys(cfg.model_dump(mode="json")):
        assert f"| `{key}` |" in text, key


def test_sections_follow_the_schema_order():
    paths = [".".join(s.path) for s in config_docs.sections()]
    assert paths[:3] == ["", "data", "data.normalization"]
    assert paths[-5:] == ["model", "task", "multitask", "training", "optimizer"]
    assert {"data.frames.train", "data.frames.val", "data.frames.test", "data.augment"} <= set(paths)


@pytest.mark.parametrize(
    "model, key, expected",
    [
        (DataConfig, "val_fraction", "float in (0.0, 1.0)"),
        (DataConfig, "test_fraction", "float in [0.0, 1.0)"),
        (DataConfig, "tile_size", "int in [16, 4096] or null"),
        (DataConfig, "num_workers", "int >= 0"),
        (DataConfig, "pre_onset", "drop | keep | as_uninfected"),
        (DataConfig, "channels", "list of int or list of str or null"),
        (DataConfig, "manifest", "path or null"),
        (MultitaskConfig, "pos_weight", "float or auto or null"),
        (MultitaskConfig, "time_scale_hours", "float > 0.0 or null"),
        (Config, "seed", "int"),
    ],
)
def test_type_text(model, key, expected):
    assert config_docs.type_text(model.model_fields[key]) == expected


@pytest.mark.parametrize(
    "value, expected",
    [(None, "null"), (True, "true"), (0.001, "0.001"), ("none", "none"), ("outputs", "outputs"), ([], "[]"),
     ([1.0, 99.8], "[1.0, 99.8]"), ({"stride": 1, "hour_window": None}, "{stride: 1, hour_window: null}")],
)
def test_yaml_value(value, expected):
    assert config_docs.yaml_value(value) == expected
    assert yaml.safe_load(expected) == value


def test_markdown_cells_escape_markup():
    assert config_docs._cell(r"a|b * c \ d") == r"a\|b \* c \\ d"


def test_check_and_write(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / config_docs.YAML_PATH).write_text("# an old hand-written example\nseed: 1\n")
    assert config_docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert config_docs.YAML_PATH in capsys.readouterr().err
    assert config_docs.main(["--write", "--root", str(tmp_path)]) == 0
    assert config_docs.main(["--check", "--root", str(tmp_path)]) == 0
    assert (tmp_path / config_docs.YAML_PATH).read_text() == EXAMPLE.read_text()
    assert (tmp_path / config_docs.MARKDOWN_PATH).read_text() == REFERENCE.read_text()


def test_not_a_repository_root(tmp_path, capsys):
    assert config_docs.main(["--check", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error:")
