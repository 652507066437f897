from pathlib import Path

import pytest
import yaml

from cellmtl.config import apply_overrides, config_from_dict, config_to_dict, load_config, parse_override
from cellmtl.errors import BadInputError


def minimal(**over):
    raw = {"data": {"manifest": "m.csv"}}
    raw.update(over)
    return raw


def test_defaults_follow_spec():
    cfg = config_from_dict(minimal())
    assert cfg.seed == 42 and cfg.output_dir == Path("outputs")
    assert cfg.data.frame_interval_hours == 1.0 and cfg.data.image_size == 128 and cfg.data.pre_onset == "drop"
    assert cfg.model.name == "resnet18" and cfg.model.pretrained is False
    assert cfg.task.mode == "multitask"
    assert cfg.multitask.infection_onset_hour == 0.0
    assert cfg.training.epochs == 50 and cfg.training.batch_size == 32
    assert cfg.training.select_metric == "cls_auc"
    assert cfg.optimizer.lr == 0.001


def test_regression_mode_selects_mae_by_default():
    cfg = config_from_dict(minimal(task={"mode": "regression"}))
    assert cfg.training.select_metric == "reg_mae"


@pytest.mark.parametrize(
    "raw, needle",
    [
        (minimal(trainig={"epochs": 3}), "unknown key 'trainig'"),
        (minimal(training={"epoch": 3}), "unknown key 'training.epoch'"),
        (minimal(training={"epochs": "many"}), "training.epochs"),
        (minimal(training={"epochs": 0}), "training.epochs"),
        (minimal(data={"manifest": "m.csv", "pre_onset": "sometimes"}), "data.pre_onset"),
        (minimal(task={"mode": "regression"}, training={"select_metric": "cls_auc"}), "select_metric"),
        (minimal(task={"mode": "classification"}, training={"select_metric": "reg_mae"}), "select_metric"),
        (minimal(data={"manifest": "m.csv", "channels": [0, 0]}), "data.channels"),
        ({"data": {}}, "data.manifest"),
        (minimal(optimizer={"lr": -1}), "optimizer.lr"),
    ],
)
def test_bad_config_names_key(raw, needle):
    with pytest.raises(BadInputError) as exc:
        config_from_dict(raw, "c.yaml")
    assert needle in str(exc.value)
    assert "c.yaml" in str(exc.value)


def test_bad_value_is_quoted():
    with pytest.raises(BadInputError, match=r"training.epochs.*'many'"):
        config_from_dict(minimal(training={"epochs": "many"}))


def test_overrides_parse_yaml_scalars_and_lists():
    assert parse_override("training.epochs=3") == (["training", "epochs"], 3)
    assert parse_override("data.channels=[0, 2]") == (["data", "channels"], [0, 2])
    assert parse_override("model.pretrained=true") == (["model", "pretrained"], True)
    assert parse_override("data.channels=null") == (["data", "channels"], None)
    raw = apply_overrides(minimal(), ["training.epochs=3", "data.image_size=64"])
    cfg = config_from_dict(raw)
    assert cfg.training.epochs == 3 and cfg.data.image_size == 64
    with pytest.raises(BadInputError, match="key=value"):
        parse_override("training.epochs")


def test_override_typo_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    with pytest.raises(BadInputError, match="unknown key 'training.epoks'"):
        load_config(path, ["training.epoks=3"])


def test_resolved_config_round_trips(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(training={"epochs": 7}, data={"manifest": "m.csv", "channels": [1]})))
    cfg = load_config(path)
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(BadInputError, match="not valid YAML"):
        load_config(bad)


def test_relative_manifest_falls_back_to_config_folder(tmp_path, monkeypatch):
    (tmp_path / "m.csv").write_text("stack_id,path,condition\n")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(minimal()))
    monkeypatch.chdir("/")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.data.manifest == (tmp_path / "m.csv").resolve()


def test_example_configs_are_valid():
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        config_from_dict(yaml.safe_load(path.read_text()), str(path))


def test_demo_yaml_matches_demo_defaults():
    from cellmtl.demo import DEMO_CONFIG

    path = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert yaml.safe_load(path.read_text()) == DEMO_CONFIG


def test_example_config_lists_every_key():
    """configs/multitask_example.yaml is the documented reference: every schema key appears in it."""
    path = Path(__file__).resolve().parents[1] / "configs" / "multitask_example.yaml"
    raw = yaml.safe_load(path.read_text())

    def keys(d, prefix=""):
        for k, v in d.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from keys(v, prefix + k + ".")

    full = set(keys(config_from_dict(raw).model_dump(mode="json")))
    missing = full - set(keys(raw)) - {"data.infected_dir", "data.uninfected_dir"}  # the manifest's alternative
    assert not missing
    assert "infected_dir + uninfected_dir" in path.read_text()
