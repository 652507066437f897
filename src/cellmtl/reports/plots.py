"""Talk-ready PNG plots of a run: learning curves, ROC, confusion matrix, predicted vs true time.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so there is
no global figure state to leak or close and this works headless and from worker threads. Each function
writes one file and returns its path (or None when the plot would be meaningless, e.g. ROC with one
class). Inputs are validated through :mod:`cellmtl.metrics`, so non-finite predictions raise ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cellmtl.metrics import classification_metrics, regression_metrics

DPI = 120
# Okabe-Ito colours: distinguishable with colour-vision deficiency and on a projector.
COLOR_TRAIN = "#0072B2"
COLOR_VAL = "#D55E00"
COLOR_UNINFECTED = "#0072B2"
COLOR_INFECTED = "#D55E00"
CLASS_NAMES = ("uninfected", "infected")

TITLE_SIZE = 13
LABEL_SIZE = 12
TICK_SIZE = 10
LEGEND_SIZE = 10

LEARNING_CURVES = "learning_curves.png"
ROC = "roc.png"
CONFUSION = "confusion_matrix.png"
TIME_SCATTER = "time_scatter.png"

def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=TITLE_SIZE)
    ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
    ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)


def save_laid_out(fig: Figure, path: Path, dpi: int = DPI) -> Path:
    """Save a figure whose layout was set by hand (colour bars in their own axes), without tight_layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    fig.clear()
    return path


def save_figure(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    fig.clear()  # free the artists now; the figure is not registered anywhere else
    return path


def _finite(value: object) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


# The learning-curve panels a user reads: (title, y label, (history key, legend label) pairs, direction of better).
CURVE_PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...], str | None], ...] = (
    ("Loss", "loss", (("train_total_loss", "train"), ("val_total_loss", "val")), "min"),
    ("Infection: validation ROC AUC", "AUC", (("val_cls_auc", "val"),), "max"),
    ("Time: validation MAE", "MAE (hours)", (("val_reg_mae", "all"), ("val_reg_mae_infected", "infected"),
                                             ("val_reg_mae_uninfected", "uninfected")), "min"),
    ("Time: slope within val stacks", "slope (1 = follows the clock)",
     (("val_reg_slope_infected", "infected"), ("val_reg_slope_uninfected", "uninfected")), None),
    ("Learning rate", "learning rate", (("lr", "lr"),), None),
)
_CURVE_COLORS = (COLOR_TRAIN, COLOR_VAL, "#009E73", "#CC79A7")


def plot_learning_curves(history: Sequence[Mapping[str, float | None]], out_dir: Path) -> list[Path]:
    """Write out_dir/learning_curves.png: the CURVE_PANELS that have data, against epoch (the best value of a
    panel's first validation line is starred). Internal quantities (RSS, epoch time, precision, ...) stay in
    metrics.csv. Returns the written paths ([] when history has nothing to plot)."""
    epochs = [float(r["epoch"]) if _finite(r.get("epoch")) else float(i + 1) for i, r in enumerate(history)]
    panels = []
    for title, ylabel, lines, better in CURVE_PANELS:
        drawn = []
        for key, label in lines:
            pts = [(x, float(r[key])) for x, r in zip(epochs, history, strict=True) if _finite(r.get(key))]
            if pts:
                drawn.append((label, pts))
        if drawn:
            panels.append((title, ylabel, drawn, better))
    if not panels:
        return []
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = new_figure(5.2 * ncols, 3.9 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, ylabel, drawn, better) in zip(axes, panels, strict=False):
        for k, (label, pts) in enumerate(drawn):
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.8, color=_CURVE_COLORS[k % 4], label=label)
        first_val = next(((lab, pts) for lab, pts in drawn if lab != "train"), None)
        if better is not None and first_val is not None:
            xs, ys = zip(*first_val[1], strict=True)
            best = int(np.argmin(ys) if better == "min" else np.argmax(ys))
            ax.plot([xs[best]], [ys[best]], marker="*", markersize=13, linestyle="none", color="black",
                    label=f"best {ys[best]:.3g} (epoch {xs[best]:g})")
        if title == "Learning rate" and all(y > 0 for _, pts in drawn for _, y in pts):
            ax.set_yscale("log")
        _style(ax, title, "epoch", ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=LEGEND_SIZE)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return [save_figure(fig, Path(out_dir) / LEARNING_CURVES)]


def _roc_points(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct score threshold, starting at (0, 0) and ending at (1, 1)."""
    order = np.argsort(-score, kind="mergesort")
    s, y = score[order], positive[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each tie group
    tps = np.cumsum(y)[last_of_run]
    fps = (last_of_run + 1) - tps
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


def plot_roc(infected: np.ndarray, prob: np.ndarray, path: Path, threshold: float = 0.5) -> Path | None:
    """ROC curve of the infected head with AUC in the legend and the operating point at ``threshold``.

    infected: (N,) 0/1; prob: (N,) P(infected). Returns None and writes nothing when only one class
    (or no sample) is present, since ROC is then undefined.
    """
    m = classification_metrics(infected, prob, threshold=threshold)
    if m["cls_auc"] is None:
        return None
    y = np.asarray(infected, dtype=float).reshape(-1) == 1
    p = np.asarray(prob, dtype=float).reshape(-1)
    fpr, tpr = _roc_points(y, p)
    pred = p >= threshold
    op_fpr = float(np.sum(pred & ~y) / np.sum(~y))
    op_tpr = float(np.sum(pred & y) / np.sum(y))

    fig = new_figure(5.5, 5.0)
    ax = fig.subplots()
    ax.plot(fpr, tpr, color=COLOR_INFECTED, linewidth=2.2, label=f"model (AUC = {m['cls_auc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance (AUC = 0.5)")
    ax.plot(
        [op_fpr], [op_tpr], marker="o", markersize=8, color="black", linestyle="none", label=f"threshold {threshold:g}"
    )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    _style(ax, f"ROC: infected vs uninfected (n = {y.size})", "false positive rate", "true positive rate")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=LEGEND_SIZE)
    return save_figure(fig, path)


def plot_confusion(infected: np.ndarray, prob: np.ndarray, path: Path, threshold: float = 0.5) -> Path:
    """2x2 confusion matrix (rows: true, columns: predicted at ``prob >= threshold``) with counts and row %."""
    m = classification_metrics(infected, prob, threshold=threshold)
    y = (np.asarray(infected, dtype=float).reshape(-1) == 1).astype(int)
    pred = (np.asarray(prob, dtype=float).reshape(-1) >= threshold).astype(int)
    counts = np.zeros((2, 2), dtype=int)
    np.add.at(counts, (y, pred), 1)
    row_totals = counts.sum(axis=1, keepdims=True)
    row_frac = np.divide(counts, row_totals, out=np.zeros((2, 2)), where=row_totals > 0)

    fig = new_figure(5.2, 4.6)
    ax = fig.subplots()
    image = ax.imshow(row_frac, cmap="Blues", vmin=0.0, vmax=1.0)
    cbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("fraction of true class", fontsize=LABEL_SIZE)
    cbar.ax.tick_params(labelsize=TICK_SIZE)
    for i in range(2):
        for j in range(2):
            color = "white" if row_frac[i, j] > 0.5 else "black"
            ax.text(
                j,
                i,
                f"{counts[i, j]}\n({100 * row_frac[i, j]:.1f}%)",
                ha="center",
                va="center",
                fontsize=LABEL_SIZE + 1,
                color=color,
            )
    ax.set_xticks([0, 1], labels=CLASS_NAMES)
    ax.set_yticks([0, 1], labels=CLASS_NAMES)
    acc = m["cls_acc"]
    subtitle = f"accuracy {acc:.3f}, threshold {threshold:g}" if acc is not None else f"threshold {threshold:g}"
    _style(ax, f"Confusion matrix (n = {y.size})\n{subtitle}", "predicted", "true")
    return save_figure(fig, path)


def plot_time_scatter(
    time_true: np.ndarray,
    time_pred: np.ndarray,
    infected: np.ndarray,
    path: Path,
    mask: np.ndarray | None = None,
) -> Path | None:
    """Predicted vs true time in hours, coloured by true class, with y = x and per-class MAE in the legend.

    Infected times count from infection onset, uninfected ones from experiment start. ``mask`` (bool,
    (N,)) keeps samples with a time target. Returns None and writes nothing when no sample remains.
    """
    m = regression_metrics(time_true, time_pred, infected=infected, mask=mask)
    if m["reg_mae"] is None:
        return None
    t = np.asarray(time_true, dtype=float).reshape(-1)
    p = np.asarray(time_pred, dtype=float).reshape(-1)
    y = np.asarray(infected, dtype=float).reshape(-1) == 1
    keep = np.ones(t.size, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).reshape(-1)

    fig = new_figure(5.8, 5.4)
    ax = fig.subplots()
    alpha = 0.7 if keep.sum() < 500 else 0.3
    for is_inf, name, color, key in (
        (False, "uninfected", COLOR_UNINFECTED, "reg_mae_uninfected"),
        (True, "infected", COLOR_INFECTED, "reg_mae_infected"),
    ):
        sel = keep & (y == is_inf)
        if not sel.any():
            continue
        ax.scatter(
            t[sel],
            p[sel],
            s=14,
            alpha=alpha,
            color=color,
            edgecolors="none",
            label=f"{name} (n = {int(sel.sum())}, MAE {m[key]:.2f} h)",
        )
    lo = float(min(t[keep].min(), p[keep].min()))
    hi = float(max(t[keep].max(), p[keep].max()))
    pad = 0.03 * (hi - lo) if hi > lo else 1.0
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1.2, label="y = x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    _style(ax, f"Predicted vs true time (MAE {m['reg_mae']:.2f} h)", "true time (hours)", "predicted time (hours)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=LEGEND_SIZE)
    fig.text(
        0.5,
        0.005,
        "infected: hours since onset · uninfected: hours since experiment start",
        ha="center",
        va="bottom",
        fontsize=TICK_SIZE - 1,
        color="dimgrey",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    fig.clear()
    return path


def write_run_plots(
    run_dir: Path,
    history: Sequence[Mapping[str, float | None]],
    val: Mapping[str, np.ndarray | None] | None,
    subdir: str = "plots",
) -> list[Path]:
    """Write all plots of a run into run_dir/'plots' and return the files written.

    val: validation arrays keyed 'infected', 'prob', 'time_true', 'time_pred', 'time_mask' (each (N,));
    'prob' or 'time_pred' may be missing/None for single-task runs, and then their plots are skipped.
    """
    plots = Path(run_dir) / subdir
    plots.mkdir(parents=True, exist_ok=True)
    written = plot_learning_curves(history, plots)
    if val is None:
        return written
    infected = val.get("infected")
    if infected is None:
        raise ValueError("val needs 'infected' to plot validation results")
    prob = val.get("prob")
    if prob is not None:
        roc = plot_roc(infected, prob, plots / ROC)
        if roc is not None:
            written.append(roc)
        written.append(plot_confusion(infected, prob, plots / CONFUSION))
    time_pred = val.get("time_pred")
    if time_pred is not None:
        time_true = val.get("time_true")
        if time_true is None:
            raise ValueError("val has 'time_pred' but no 'time_true'")
        scatter = plot_time_scatter(time_true, time_pred, infected, plots / TIME_SCATTER, mask=val.get("time_mask"))
        if scatter is not None:
            written.append(scatter)
    return written


def plot_time_bins(bins: Sequence[Mapping[str, float | None]], path: Path) -> Path | None:
    """AUC and accuracy (left) and time MAE per class (right) per bin of hours since experiment start."""
    if not bins:
        return None
    centers = [(b["hour_start"] + b["hour_end"]) / 2 for b in bins]
    fig = new_figure(11.0, 4.2)
    ax_cls, ax_reg = fig.subplots(1, 2)
    for key, label, color in (("cls_auc", "AUC", COLOR_INFECTED), ("cls_acc", "accuracy", COLOR_TRAIN)):
        pts = [(c, b[key]) for c, b in zip(centers, bins, strict=True) if b.get(key) is not None]
        if pts:
            ax_cls.plot(*zip(*pts, strict=True), marker="o", label=label, color=color)
    ax_cls.axhline(0.99, color="grey", ls="--", lw=1, label="0.99")
    ax_cls.legend(fontsize=LEGEND_SIZE)
    _style(ax_cls, "Classification over time", "hours since experiment start", "score")
    for key, label, color in (("reg_mae_infected", "infected", COLOR_INFECTED),
                              ("reg_mae_uninfected", "uninfected", COLOR_UNINFECTED)):
        pts = [(c, b[key]) for c, b in zip(centers, bins, strict=True) if b.get(key) is not None]
        if pts:
            ax_reg.plot(*zip(*pts, strict=True), marker="o", label=label, color=color)
    if ax_reg.lines:
        ax_reg.legend(fontsize=LEGEND_SIZE)
    _style(ax_reg, "Time error over time", "hours since experiment start", "MAE (hours)")
    return save_figure(fig, Path(path))


def plot_onset_per_stack(stacks: Sequence[Mapping], true_onset: Mapping[str, float], path: Path) -> Path | None:
    """For every stack predicted infected whose true onset is known: the estimated `est_onset_hour` beside
    the true one (hours since start), the stack's `onset_fit_slope` in its label (trust near 1). None when
    no stack qualifies."""
    rows = [r for r in stacks if r.get("est_onset_hour") is not None and r["stack_id"] in true_onset]
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: (true_onset[r["stack_id"]], r["stack_id"]))
    fig = new_figure(max(5.0, 0.55 * len(rows) + 2.0), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(rows))
    ax.plot(x, [true_onset[r["stack_id"]] for r in rows], "s", color=COLOR_TRAIN, markersize=8, label="true onset")
    ax.plot(x, [r["est_onset_hour"] for r in rows], "o", color=COLOR_INFECTED, markersize=8, label="estimated")
    labels = [f"{r['stack_id']}\nslope {r['onset_fit_slope']:.2f}" if r.get("onset_fit_slope") is not None
              else str(r["stack_id"]) for r in rows]
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
    _style(ax, "Infection onset per stack", "", "hours since start")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=LEGEND_SIZE)
    return save_figure(fig, path)
