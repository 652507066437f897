"""What quality_holdout.py and predict_holdout.py share: render the hold-out experiment, train on it with the
defaults, and the mean-time baseline."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
import yaml

HERE = Path(__file__).resolve().parent


def make_data(out: Path, seed: int, stacks: int = 12) -> Path:
    """Render holdout_experiment.py's experiment into `out/data_seed{seed}_{stacks}stacks` unless it is there
    (both scripts then share it); returns the manifest."""
    out = out / f"data_seed{seed}_{stacks}stacks"
    manifest = out / "manifest.csv"
    if not manifest.is_file():
        subprocess.run(
            [sys.executable, str(HERE / "holdout_experiment.py"), "--out", str(out), "--seed", str(seed),
             "--stacks", str(stacks)],
            check=True,
            capture_output=True,
        )
    return manifest


def train_run(manifest: Path, out: Path, name: str, seed: int, overrides: list[str]) -> Path:
    """Train with the defaults at the acceptance's settings (resnet18, image_size 96, 12 epochs) plus
    `overrides` (`key=value`, as `--set`); returns the run folder that `cellmtl train` printed last."""
    cfg = {
        "experiment_name": name,
        "output_dir": str(out / "runs"),
        "seed": seed,
        "data": {"manifest": str(manifest), "image_size": 96},
        "model": {"name": "resnet18"},
        "training": {"epochs": 12, "progress": False},
    }
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / f"config_{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "cellmtl", "train", "--config", str(cfg_path)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    return Path(proc.stdout.strip().splitlines()[-1])


def mean_baseline(manifest: Path) -> float:
    """MAE (h) of predicting the training split's mean time target for every val frame (pre-onset frames
    dropped, uninfected frames timed from the experiment's start, as the defaults do)."""
    targets: dict[str, list[float]] = {"train": [], "val": []}
    for r in csv.DictReader(manifest.open()):
        with tifffile.TiffFile(manifest.parent / r["path"]) as tif:
            n_frames = tif.series[0].shape[0]
        start, dt = float(r["start_hour"] or 0), float(r["frame_interval_hours"] or 1)
        onset = float(r["infection_onset_hour"]) if r["condition"] == "infected" else None
        hours = start + dt * np.arange(n_frames)
        if onset is not None:
            hours = hours[hours >= onset] - onset
        targets[r["split"]].extend(hours.tolist())
    return float(np.mean(np.abs(np.array(targets["val"]) - np.mean(targets["train"]))))


def within_stack_slopes(run: Path) -> dict[str, list[float]]:
    """Least-squares slope of predicted against true time inside each val stack, grouped by condition: near 1
    when the time head tracks the clock, near 0 when it gives one value per stack."""
    frames: dict[str, list[tuple[float, float, str]]] = {}
    for r in csv.DictReader((run / "predictions_val.csv").open()):
        if r["time_target"] != "":
            frames.setdefault(r["stack_id"], []).append(
                (float(r["time_target"]), float(r["pred_time_hours"]), r["condition"]))
    slopes: dict[str, list[float]] = {}
    for rows in frames.values():
        t, p = np.array([x[0] for x in rows]), np.array([x[1] for x in rows])
        if len(rows) > 2 and np.ptp(t) > 0:
            slopes.setdefault(rows[0][2], []).append(float(np.polyfit(t, p, 1)[0]))
    return slopes
