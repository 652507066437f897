"""Error review: the frames a model gets most wrong, as a CSV and a thumbnail sheet.

Biologists check whether mistakes cluster in early frames, one bad well or out-of-focus frames; that
needs the frames themselves, not only a metric. Also holds `composite`, the channels-to-RGB view that
`explain` overlays its heat maps on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from cellmtl.fileio import write_csv
from cellmtl.reports.images import composite
from cellmtl.reports.plots import new_figure, save_figure

COLUMNS = ["kind", "rank", "stack_id", "frame", "hours_since_start", "condition", "truth", "prediction", "error"]


def top_errors(
    infected: np.ndarray,
    prob: np.ndarray | None,
    time_true: np.ndarray | None,
    time_pred: np.ndarray | None,
    k: int,
    threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """(classification, time) frame indices, worst first: at most `k` misclassified frames (known label,
    ranked by |prob - label|) and `k` frames with a time target ranked by |pred - true| hours."""
    labels = np.asarray(infected)
    cls = np.zeros(0, dtype=np.int64)
    if prob is not None:
        wrong = np.flatnonzero((labels >= 0) & ((np.asarray(prob) >= threshold) != (labels == 1)))
        err = np.abs(np.asarray(prob)[wrong] - labels[wrong])
        cls = wrong[np.argsort(-err, kind="stable")][:k]
    tim = np.zeros(0, dtype=np.int64)
    if time_true is not None and time_pred is not None:
        known = np.flatnonzero(np.isfinite(time_true))
        err = np.abs(np.asarray(time_pred)[known] - np.asarray(time_true)[known])
        tim = known[np.argsort(-err, kind="stable")][:k]
    return cls, tim


def error_rows(
    arrays: dict[str, np.ndarray | None], stack_ids: Sequence[str], frames: np.ndarray, hours: np.ndarray,
    cls: np.ndarray, tim: np.ndarray,
) -> list[dict]:
    """CSV rows for `top_errors`' picks: truth/prediction are condition/prob_infected for classification
    rows and hours for time rows; `error` is the absolute error."""
    labels = arrays["infected"]
    assert labels is not None
    rows = []
    for kind, picks in (("classification", cls), ("time", tim)):
        for rank, i in enumerate(picks, 1):
            cond = "infected" if labels[i] == 1 else "uninfected"
            if kind == "classification":
                truth, pred = cond, float(arrays["prob"][i])  # type: ignore[index]
                err = abs(pred - float(labels[i]))
            else:
                truth, pred = float(arrays["time_true"][i]), float(arrays["time_pred"][i])  # type: ignore[index]
                err = abs(pred - truth)
            rows.append({
                "kind": kind, "rank": rank, "stack_id": stack_ids[i], "frame": int(frames[i]),
                "hours_since_start": round(float(hours[i]), 4), "condition": cond,
                "truth": truth if isinstance(truth, str) else round(truth, 4), "prediction": round(pred, 4),
                "error": round(err, 4),
            })
    return rows


def plot_error_sheet(
    sections: Sequence[tuple[str, Sequence[int], Sequence[str]]], load: Callable[[int], torch.Tensor], path: Path,
    ncols: int = 6,
) -> Path:
    """One titled block of thumbnails per (title, frame indices, captions) section."""
    layout = [(title, idx, caps) for title, idx, caps in sections]
    nrows = sum(max(1, math.ceil(len(idx) / ncols)) for _, idx, _ in layout)
    fig = new_figure(2.0 * ncols, 2.3 * nrows + 0.4 * len(layout))
    grid = fig.add_gridspec(nrows, ncols)
    row = 0
    for title, idx, caps in layout:
        rows_here = max(1, math.ceil(len(idx) / ncols))
        for j in range(rows_here * ncols):
            ax = fig.add_subplot(grid[row + j // ncols, j % ncols])
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_title(f"{title}\n{caps[0]}" if caps else f"{title}: none", fontsize=8, loc="left")
            if j < len(idx):
                ax.imshow(composite(load(int(idx[j]))), interpolation="nearest")
                if j:
                    ax.set_title(caps[j], fontsize=8)
            else:
                ax.axis("off")
        row += rows_here
    return save_figure(fig, path)


def write_error_review(
    out_dir: Path, split: str, arrays: dict[str, np.ndarray | None], stack_ids: Sequence[str], frames: np.ndarray,
    hours: np.ndarray, load: Callable[[int], torch.Tensor], k: int,
) -> tuple[Path, Path]:
    """`errors_<split>.csv` and `errors_<split>.png` in `out_dir`; `load(i)` gives frame i's model input."""

    cls, tim = top_errors(arrays["infected"], arrays["prob"], arrays["time_true"], arrays["time_pred"], k)
    rows = error_rows(arrays, stack_ids, frames, hours, cls, tim)
    csv_path = out_dir / f"errors_{split}.csv"
    write_csv(rows, csv_path, COLUMNS)
    caps = {
        kind: [f"{r['stack_id']} f{r['frame']} {r['hours_since_start']:g}h\n"
               + (f"{r['truth']} p={r['prediction']:.2f}" if kind == "classification"
                  else f"true {r['truth']:.1f} pred {r['prediction']:.1f} h")
               for r in rows if r["kind"] == kind]
        for kind in ("classification", "time")
    }
    sections = []
    if arrays["prob"] is not None:
        sections.append((f"classification mistakes (top {k})", list(cls), caps["classification"]))
    if arrays["time_pred"] is not None:
        sections.append((f"time errors (top {k})", list(tim), caps["time"]))
    png = plot_error_sheet(sections, load, out_dir / f"errors_{split}.png")
    return csv_path, png
