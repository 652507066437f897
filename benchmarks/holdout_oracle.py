#!/usr/bin/env python
"""Is the time in the images at all? A hand-made-feature baseline on the hold-out experiment, run before blaming
(or crediting) the network's training defaults for its time error.

    python benchmarks/holdout_oracle.py [--seeds 0 1 2] [--out /tmp/cellmtl_holdout] [--stacks 12]
        [--course synchronous|spread|cascade]

For every frame it measures simple per-channel quantities after the same per-image percentile scaling the
defaults use (object count and median object area after a fixed threshold, bright-area fraction, mean inside
and over the image, how much of the reporter area lies on nuclei), fits one ridge regression per condition on the
training stacks and prints, per seed, the val MAE in hours (infected / uninfected) beside the error of always
predicting the training mean. Where this baseline stays near the mean predictor, the frames do not show the time in
a way that transfers between wells, and no network default can be expected to find it from the same 8 wells.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import tifffile
import torch
from holdout_common import make_data, mean_predictor_mae, time_targets
from holdout_experiment import COURSES
from scipy import ndimage as ndi
from sklearn.linear_model import RidgeCV

from cellmtl.config import NormalizationConfig
from cellmtl.data.transforms import Normalizer

# The defaults' per-image scaling, the package's own.
SCALE = Normalizer("per_image", tuple(NormalizationConfig().percentiles))


def frame_features(frame: np.ndarray) -> list[float]:
    """Gain-free measurements of one [2, Y, X] frame (ch0 nuclei, ch1 reporter)."""
    nuc, rep = SCALE(torch.from_numpy(frame.astype(np.float32))).clamp_(0.0, 1.0).numpy()
    out: list[float] = []
    masks = []
    for img, thr, min_px in ((nuc, 0.25, 8), (rep, 0.15, 20)):
        mask = img > thr
        labels, _ = ndi.label(mask)
        areas = np.bincount(labels.ravel())[1:]
        areas = areas[areas > min_px]
        out += [len(areas), float(np.median(areas)) if len(areas) else 0.0, mask.mean(),
                float(img[mask].mean()) if mask.any() else 0.0, img.mean()]
        masks.append(mask)
    out.append((masks[0] & masks[1]).mean() / max(masks[1].mean(), 1e-6))
    return out


def table(manifest: Path) -> dict[str, np.ndarray]:
    """Features, time targets (as the defaults define them: pre-onset frames dropped), condition and split."""
    x, y, infected, split = [], [], [], []
    for r in csv.DictReader(manifest.open()):
        stack = tifffile.imread(manifest.parent / r["path"])
        for f, target in enumerate(time_targets(r, stack.shape[0])):
            if np.isnan(target):
                continue
            x.append(frame_features(stack[f]))
            y.append(target)
            infected.append(r["condition"] == "infected")
            split.append(r["split"])
    return {"x": np.array(x), "y": np.array(y), "infected": np.array(infected), "split": np.array(split)}


def oracle_mae(t: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """(val MAE, infected MAE, uninfected MAE) of a ridge per condition, hours."""
    pred = np.zeros_like(t["y"])
    val = t["split"] == "val"
    for cls in (True, False):
        tr, va = (t["split"] == "train") & (t["infected"] == cls), val & (t["infected"] == cls)
        model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(t["x"][tr], t["y"][tr])
        pred[va] = model.predict(t["x"][va])
    err = np.abs(pred - t["y"])
    return float(err[val].mean()), float(err[val & t["infected"]].mean()), float(err[val & ~t["infected"]].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("/tmp/cellmtl_holdout"))
    ap.add_argument("--stacks", type=int, default=12)
    ap.add_argument("--course", choices=COURSES, default="synchronous")
    args = ap.parse_args()
    for seed in args.seeds:
        manifest = make_data(args.out, seed, args.stacks, args.course)
        t = table(manifest)  # its targets also give the mean predictor: no second pass over the stacks
        mae, inf, uninf = oracle_mae(t)
        mean = mean_predictor_mae(t["y"], t["split"])
        print(f"seed {seed} ({args.course}): feature ridge val MAE {mae:.2f} h (infected {inf:.2f}, "
              f"uninfected {uninf:.2f}); mean predictor {mean:.2f} h", flush=True)


if __name__ == "__main__":
    main()
