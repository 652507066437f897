"""What a person sees on the terminal: plain lines when stderr is not a terminal, the answer at the end of cv,
--device on every command that runs a model, no 'best' line for an undefined metric."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cellmtl.cli import main
from cellmtl.runtime import Countdown, format_duration
from tests.conftest import write_config

pytestmark = pytest.mark.slow


def test_a_captured_run_has_no_carriage_returns_and_train_takes_device(tiny_config, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "cellmtl", "train", "--config", str(tiny_config), "--device", "cpu",
                           "--set", "training.progress=true"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr and "Epoch 2/2" in done.stderr  # plain lines, one per epoch
    run = Path(done.stdout.strip().splitlines()[-1])
    assert "device: cpu" in (run / "config.yaml").read_text()
    predicted = subprocess.run([sys.executable, "-m", "cellmtl", "predict", "--checkpoint",
                                str(run / "checkpoints" / "best.pt"), "--manifest", str(tiny_config.parent /
                                                                                       "manifest.csv"),
                                "--out", str(tmp_path / "p.csv"), "--device", "cpu"],
                               capture_output=True, text=True, timeout=600, env=env)
    assert predicted.returncode == 0 and "\r" not in predicted.stderr, predicted.stderr[-2000:]


def test_cv_ends_with_its_table(capsys, tiny_config):
    assert main(["cv", "--config", str(tiny_config), "--folds", "2", "--set", "training.epochs=1",
                 "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "cv: 1/2 done (fold 1 seed 1); about" in err and "cv: 2/2 done (fold 2 seed 1)" in err
    tail = err[err.index("cv: 2/2 done"):]
    assert "| cls_auc |" in tail or "cls_auc" in tail  # the summary table comes after the last run
    assert Path(out.strip().splitlines()[-1]).is_dir()


def test_no_best_line_for_an_undefined_metric(tiny_experiment, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_experiment, training={"epochs": 2},
                       data={"val_stacks": ["s0", "s1"], "frames": {"val": {"hour_window": [0, 0.5]}}})
    assert main(["train", "--config", str(cfg)]) == 0
    log = next((tmp_path / "outputs" / "t").glob("*/train.log")).read_text()
    assert "New best model" not in log
    assert "cls_auc is undefined on this validation split" in log


def test_countdown_and_durations(capsys):
    c = Countdown("cv", 3)
    assert c.step("fold 1").startswith("cv: 1/3 done (fold 1); about")
    c.step("fold 2")
    assert c.step("fold 3") == "cv: 3/3 done (fold 3)"
    assert [format_duration(s) for s in (5, 600, 3900, 7500)] == ["5 s", "10 min", "65 min", "2 h 05 min"]
