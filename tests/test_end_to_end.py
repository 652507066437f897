"""Tiny experiment: train 2 epochs -> every run-folder file valid -> resume to 3 -> evaluate -> predict."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cellmtl.cli import main
from cellmtl.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def cli(capsys, *args: str) -> str:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.strip().splitlines()[-1]


def test_train_resume_evaluate_predict(capsys, tiny_config, tiny_experiment, tmp_path):
    run = Path(cli(capsys, "train", "--config", str(tiny_config), "--set", "data.test_fraction=0.25",
                   "--set", "data.normalization.mode=dataset"))
    assert run.parent == tmp_path / "outputs" / "t"
    for name in ("checkpoints/best.pt", "checkpoints/last.pt", "config.yaml", "splits.csv", "results.json",
                 "metrics.csv", "train.log", "predictions_val.csv", "predictions_test.csv",
                 "plots/learning_curves.png", "plots/confusion_matrix.png", "plots/time_scatter.png", "report.html"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name

    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["channels"] == [0, 1] and ckpt["config"]["data"]["image_size"] == 32
    assert ckpt["normalizer"]["mode"] == "dataset" and len(ckpt["normalizer"]["lo"]) == 2
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "rng", "config", "best_metric", "splits"}
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert "optimizer" not in best and best["metrics"]["cls_auc"] is not None  # the model and what feeds it
    assert not list((run / "checkpoints").glob("*.prev.pt")) and not list((run / "checkpoints").glob(".*"))
    assert (run / "checkpoints" / "best.pt").stat().st_mode & 0o044, "readable by colleagues (the umask's mode)"

    results = json.loads((run / "results.json").read_text())
    assert results["history_length"] == 2 and 1 <= results["best_epoch"] <= 2
    assert set(METRIC_NAMES) <= set(results["best"]) and "test" in results
    assert results["selection_note"] is None or results["selection_note"].startswith("note: best.pt is epoch")
    slopes = [results["best"][k] for k in ("reg_slope_infected", "reg_slope_uninfected")]
    assert all(isinstance(v, float) for v in slopes)  # every val stack has 3+ timed frames
    assert (results["time_note"] is None) == all(v >= 0.5 for v in slopes)
    metrics = read_csv(run / "metrics.csv")
    assert [r["epoch"] for r in metrics] == ["1", "2"]
    assert {"train_total_loss", "train_cls_loss", "train_reg_loss", "val_cls_auc", "val_reg_mae"} <= set(metrics[0])

    splits = read_csv(run / "splits.csv")
    assert len(splits) == 8 and {r["split"] for r in splits} == {"train", "val", "test"}
    groups: dict[str, set[str]] = {}
    for r in splits:
        groups.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in groups.values()), "a group sits in two splits"

    log = (run / "train.log").read_text()
    assert "train - total_loss:" in log and "val: total_loss:" in log and "New best model! cls_auc=" in log

    preds = read_csv(run / "predictions_val.csv")
    val_ids = {r["stack_id"] for r in splits if r["split"] == "val"}
    assert {p["stack_id"] for p in preds} == val_ids
    assert {"stack_id", "frame", "hours_since_start", "prob_infected", "pred_condition", "pred_time_hours",
            "condition", "time_target", "well"} <= set(preds[0])

    # Resume to 3 epochs: same folder, metrics extended by one row, config updated.
    again = Path(cli(capsys, "train", "--resume", str(run), "--set", "training.epochs=3"))
    assert again == run
    assert [r["epoch"] for r in read_csv(run / "metrics.csv")] == ["1", "2", "3"]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["epochs"] == 3
    assert json.loads((run / "results.json").read_text())["history_length"] == 3

    out = Path(cli(capsys, "evaluate", "--run", str(run), "--split", "test", "--top-k", "3"))
    ev = json.loads(out.read_text())
    assert ev["split"] == "test" and set(METRIC_NAMES) <= set(ev["metrics"])
    assert ev["time_bins_3h"] and sum(b["n"] for b in ev["time_bins_3h"]) == ev["n_frames"]
    assert "reg_mae" in ev["ci95_bootstrap_over_stacks"] and "earliest_hour_auc_ge_0.99_two_bins" in ev
    assert (run / "plots" / "evaluation_test" / "metrics_vs_time.png").is_file()
    assert len(read_csv(run / "per_stack_test.csv")) == ev["n_stacks"]
    errors = read_csv(run / "errors_test.csv")  # error review: at most 3 per task, worst first
    assert {r["kind"] for r in errors} <= {"classification", "time"} and (run / "errors_test.png").is_file()
    times = [float(r["error"]) for r in errors if r["kind"] == "time"]
    assert len(times) == 3 and times == sorted(times, reverse=True)
    report = (run / "report.html").read_text()
    assert "Evaluation of the test split" in report and "Training results" in report and "At a glance" in report
    images = re.findall(r'src="(data:image/png;base64,[^"]+)"', report)
    assert len(images) >= 5 and len(set(images)) == len(images)  # every figure once

    pred_csv = tmp_path / "pred.csv"
    cli(capsys, "predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--manifest", str(tiny_experiment),
        "--out", str(pred_csv))
    rows = read_csv(pred_csv)
    assert len(rows) == 8 * 6  # every frame of every stack, pre-onset frames too
    assert all(0.0 <= float(r["prob_infected"]) <= 1.0 for r in rows)
    stacks = read_csv(tmp_path / "pred.stacks.csv")
    assert len(stacks) == 8 and {"stack_id", "prob_infected", "pred_condition", "frac_frames_infected",
                                 "est_onset_hour"} <= set(stacks[0])


def test_same_seed_same_metrics(capsys, tiny_config):
    a = Path(cli(capsys, "train", "--config", str(tiny_config), "--set", "training.epochs=1"))
    b = Path(cli(capsys, "train", "--config", str(tiny_config), "--set", "training.epochs=1"))
    assert a != b
    ra, rb = (json.loads((r / "results.json").read_text())["best"] for r in (a, b))
    assert ra == rb
    ckpt = torch.load(a / "checkpoints" / "best.pt", weights_only=True)
    norm = ckpt["normalizer"]
    assert (norm["mode"], norm["percentiles"], norm["lo"], norm["hi"]) == ("per_image", [1.0, 99.8], None, None)
    assert norm["floor"] is None  # data.normalization.range_floor is opt-in


def test_train_py_classification_mode(tiny_config, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(tiny_config), "--set", "task.mode=classification",
         "--set", "training.epochs=1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    run = Path(proc.stdout.strip().splitlines()[-1])
    results = json.loads((run / "results.json").read_text())
    assert results["select_metric"] == "cls_auc"
    assert "cls_auc" in results["best"] and "reg_mae" not in results["best"]
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["model_spec"]["mode"] == "classification"
    assert not any(k.startswith("time_head") for k in ckpt["model"])


def test_sigkill_mid_epoch_then_resume(tiny_config, tmp_path):
    """A run killed with SIGKILL mid-epoch resumes from last.pt; metrics.csv has one row per epoch, no gap."""
    import os
    import signal
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cellmtl", "train", "--config", str(tiny_config), "--set", "training.epochs=6"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    runs = tmp_path / "outputs" / "t"
    deadline = time.time() + 300
    last = None
    while time.time() < deadline:
        found = list(runs.glob("*/checkpoints/last.pt")) if runs.exists() else []
        if found:
            last = found[0]
            break
        time.sleep(0.05)
    assert last is not None, "no checkpoint appeared"
    time.sleep(0.3)  # now inside a later epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    run = last.parent.parent
    killed_at = torch.load(last, weights_only=True)["epoch"]
    assert killed_at < 6, "the run finished before it could be killed"

    done = subprocess.run([sys.executable, "-m", "cellmtl", "train", "--resume", str(run)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip().splitlines()[-1]) == run
    assert [r["epoch"] for r in read_csv(run / "metrics.csv")] == [str(e) for e in range(1, 7)]
    assert json.loads((run / "results.json").read_text())["history_length"] == 6
    assert f"resumed {run} at epoch {killed_at}" in (run / "train.log").read_text()


def test_export_onnx_matches_pytorch(capsys, tiny_config, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    from cellmtl.checkpoints import Checkpoint

    run = Path(cli(capsys, "train", "--config", str(tiny_config), "--set", "training.epochs=1"))
    ckpt_path = run / "checkpoints" / "best.pt"
    out = Path(cli(capsys, "export", "--checkpoint", str(ckpt_path), "--format", "onnx", "--out",
                   str(tmp_path / "m.onnx")))
    model = Checkpoint.load(ckpt_path).network()
    x = torch.randn(3, 2, 32, 32)
    with torch.no_grad():
        ref = model(x)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    prob, hours = sess.run(None, {"image": x.numpy()})
    np.testing.assert_allclose(prob, torch.sigmoid(ref["infected"]).numpy(), atol=1e-4)
    np.testing.assert_allclose(hours, model.time_hours(ref["time"]).numpy(), atol=1e-4)
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["cellmtl.channels"]) == [0, 1] and meta["cellmtl.image_size"] == "32"
    # As a user runs it: the exporter's optimiser logs ~20 INFO lines per export, which the CLI keeps quiet
    # (libraries from WARNING); stdout is the path alone.
    proc = subprocess.run([sys.executable, "-m", "cellmtl", "export", "--checkpoint", str(ckpt_path), "--format",
                           "onnx", "--out", str(tmp_path / "m2.onnx")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "m2.onnx") and "INFO" not in proc.stderr, proc.stderr


def test_demo_is_synth_train_evaluate(capsys, tmp_path):
    """The SPEC's demo: synth + train + evaluate, so its report has the evaluation's bootstrap intervals."""
    run = Path(cli(capsys, "demo", "--out", str(tmp_path / "demo"), "--epochs", "1"))
    assert run.parent.parent == tmp_path / "demo" / "runs"
    assert len(read_csv(tmp_path / "demo" / "data" / "manifest.csv")) == 12
    ev = json.loads((run / "evaluation_val.json").read_text())
    assert ev["split"] == "val" and ev["checkpoint"].endswith("best.pt") and ev["n_stacks"] == 4
    assert set(ev["ci95_bootstrap_over_stacks"]) >= {"cls_auc", "reg_mae"}
    assert (run / "per_stack_val.csv").is_file()
    html = (run / "report.html").read_text()
    assert "95% CI" in html and "bootstrap over stacks" in html
