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

import cellmtl.data.targets as package_targets

HERE = Path(__file__).resolve().parent


def make_data(out: Path, seed: int, stacks: int = 12, course: str = "synchronous") -> Path:
    """Render holdout_experiment.py's experiment into `out/data_{course}_seed{seed}_{stacks}stacks` unless it is
    there (both scripts then share it); returns the manifest."""
    out = out / f"data_{course}_seed{seed}_{stacks}stacks"
    manifest = out / "manifest.csv"
    if not manifest.is_file():
        subprocess.run(
            [sys.executable, str(HERE / "holdout_experiment.py"), "--out", str(out), "--seed", str(seed),
             "--stacks", str(stacks), "--course", course],
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


def time_targets(row: dict[str, str], n_frames: int) -> np.ndarray:
    """Each frame's time target in hours for a manifest row, by the package's own definition with the defaults
    (`pre_onset: drop`, `uninfected_time: elapsed`); NaN for the pre-onset frames the defaults drop."""
    interval, start = float(row["frame_interval_hours"] or 1), float(row["start_hour"] or 0)
    hours = package_targets.hours_since_start(n_frames, interval, start)
    infected = row["condition"] == "infected"
    onset = float(row["infection_onset_hour"]) if infected else None
    target, _, keep = package_targets.time_targets(hours, infected, onset, "drop", "elapsed")
    return np.where(keep, target, np.nan)


def mean_predictor_mae(targets: np.ndarray, split: np.ndarray) -> float:
    """MAE (h) of predicting the training split's mean time target for every val frame (NaN targets left out)."""
    t, split = np.asarray(targets, dtype=float), np.asarray(split)
    timed = np.isfinite(t)
    return float(np.mean(np.abs(t[timed & (split == "val")] - t[timed & (split == "train")].mean())))


def mean_baseline(manifest: Path) -> float:
    """`mean_predictor_mae` of a rendered experiment, from its manifest and the stacks' frame counts."""
    targets, split = [], []
    for r in csv.DictReader(manifest.open()):
        with tifffile.TiffFile(manifest.parent / r["path"]) as tif:
            t = time_targets(r, tif.series[0].shape[0])
        targets.extend(t.tolist())
        split.extend([r["split"]] * len(t))
    return mean_predictor_mae(np.array(targets), np.array(split))
