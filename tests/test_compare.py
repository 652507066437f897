"""`cellmtl compare`: one split for every mode, the classical row, the tables; the science by hand."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from cellmtl.cli import main
from cellmtl.compare import image_features, markdown_summary, mode_config, paired_test
from cellmtl.config import load_config

from .conftest import write_config


@pytest.mark.slow
def test_compare_seeds_1_writes_tables_and_prints_folder_last(capsys, tmp_path, tiny_experiment):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_experiment, training={"epochs": 1})
    assert main(["compare", "--config", str(cfg), "--seeds", "1"]) == 0
    folder = tmp_path / capsys.readouterr().out.strip().splitlines()[-1]
    rows = list(csv.DictReader((folder / "comparison.csv").open()))
    assert [r["mode"] for r in rows] == ["multitask", "classification", "regression", "classical"]
    assert [r["kind"] for r in rows] == ["deep", "deep", "deep", "classical"]
    assert rows[0]["val_cls_auc"] and rows[0]["val_reg_mae"] and rows[3]["val_cls_auc"] and rows[3]["val_reg_mae"]
    assert rows[1]["val_reg_mae"] == "" and rows[2]["val_cls_auc"] == ""
    # every row with a time output says whether it reads the clock inside a stack; classification-only has none
    assert all(rows[i]["val_reg_slope_infected"] != "" for i in (0, 2, 3)) and rows[1]["val_reg_slope_infected"] == ""
    splits = {(Path(r["run_dir"]) / "splits.csv").read_text() for r in rows[:3]}
    assert len(splits) == 1  # the same split in every run
    md = (folder / "comparison.md").read_text()
    assert "| classical (features + random forests) |" in md and "**" in md and (folder / "comparison.png").is_file()
    header = next(line for line in md.splitlines() if line.startswith("| mode |"))
    assert header.endswith("| reg_slope_infected | reg_slope_uninfected |")
    classical = next(line for line in md.splitlines() if line.startswith("| classical"))
    slope_cells = classical.rstrip(" |").split(" | ")[-2:]
    assert slope_cells == [f"{float(rows[3][f'val_{k}']):.3f}" for k in ("reg_slope_infected", "reg_slope_uninfected")]


def test_mode_config_keeps_split_and_drops_multitask_only_options(tmp_path, tiny_experiment):
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_experiment, multitask={"weighting": "dwa"},
                                   training={"select_metric": "cls_f1"}))
    c = mode_config(cfg, "regression", 7, tmp_path / "runs", {"a": "train", "b": "val", "c": "train"})
    assert (c.seed, c.task.mode, c.multitask.weighting, c.training.select_metric) == (7, "regression", "fixed",
                                                                                      "reg_mae")
    assert (c.data.train_stacks, c.data.val_stacks, c.data.test_stacks) == (["a", "c"], ["b"], [])


def test_paired_test_by_hand():
    assert paired_test([1.0], [0.0]) is None
    t = paired_test([0.9, 0.8, 0.7], [0.8, 0.8, 0.5])  # differences 0.1, 0, 0.2: mean 0.1, sd 0.1
    assert t["mean_diff"] == pytest.approx(0.1) and (t["a_wins"], t["b_wins"], t["n"]) == (2, 0, 3)
    # t = 0.1 / (0.1 / sqrt(3)) = 1.732 on 2 df -> two-sided p = 0.2254
    assert t["p"] == pytest.approx(0.2254, abs=1e-3)


def test_markdown_marks_best_lower_mae():
    rows = [{"mode": m, "seed": s, "val_reg_mae": v} for m, s, v in
            [("multitask", 0, 2.0), ("multitask", 1, 3.0), ("regression", 0, 1.0), ("regression", 1, 2.0)]]
    md = markdown_summary(rows, {"a": "train"})
    assert "| regression | – | – | – | **1.500 ± 0.707** | – | – | – | – |" in md
    assert "| reg_mae | regression | +1.000 |" in md


def test_image_features_by_hand():
    img = np.zeros((2, 8, 8), dtype=np.float32)
    img[1, 4, 4] = 64.0  # one bright spot in channel 1: mean 1, no texture in channel 0
    f = image_features(img)
    assert f.shape == (16,) and np.all(f[:8] == 0)
    assert f[8] == pytest.approx(1.0) and f[15] == pytest.approx(1 / 64)


@pytest.mark.slow
def test_compare_strategies_on_one_split(capsys, tmp_path, tiny_experiment):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_experiment, training={"epochs": 1})
    assert main(["compare", "--config", str(cfg), "--seeds", "2", "--strategies", "scratch", "probe"]) == 0
    folder = tmp_path / capsys.readouterr().out.strip().splitlines()[-1]
    rows = list(csv.DictReader((folder / "comparison.csv").open()))
    assert [r["mode"] for r in rows] == ["scratch", "probe", "classical"] * 2
    assert len({(Path(r["run_dir"]) / "splits.csv").read_text() for r in rows if r["run_dir"]}) == 1
    probe_cfg = load_config(Path(rows[1]["run_dir"]) / "config.yaml")
    assert probe_cfg.training.strategy == "probe" and probe_cfg.model.head_hidden == 0
    md = (folder / "comparison.md").read_text()
    assert md.startswith("# Training strategies compared") and "each strategy minus scratch" in md
    assert "| reg_mae | probe | scratch |" in md


def test_compare_rejects_unknown_strategies(tmp_path, tiny_experiment, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_experiment)
    assert main(["compare", "--config", str(cfg), "--strategies", "probe", "magic"]) == 2
    assert "--strategies probe magic" in capsys.readouterr().err
