"""cellmtl.reports.plots writes readable PNGs headless, and skips plots that would be meaningless."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot; reporting itself never touches pyplot

import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from cellmtl.reports.plots import (  # noqa: E402
    _roc_points,
    plot_confusion,
    plot_learning_curves,
    plot_roc,
    plot_time_scatter,
    write_run_plots,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_px: int = 300) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(path)
    height, width = image.shape[:2]
    assert min_px <= width <= 5000 and min_px <= height <= 5000, image.shape
    assert image.std() > 0  # something is drawn, not a blank canvas


def _history(n_epochs: int = 6, with_gaps: bool = True) -> list[dict[str, float | None]]:
    rows: list[dict[str, float | None]] = []
    for e in range(1, n_epochs + 1):
        rows.append(
            {
                "epoch": e,
                "train_total_loss": 1.0 / e,
                "train_cls_loss": 0.6 / e,
                "train_reg_loss": 0.4 / e,
                "val_total_loss": 1.1 / e + 0.01 * e,
                "val_cls_loss": 0.7 / e,
                "val_reg_loss": 0.4 / e,
                "val_cls_auc": None if (with_gaps and e == 1) else 0.7 + 0.04 * e,
                "val_reg_mae": 5.0 / e,
                "val_reg_mae_infected": float("nan") if (with_gaps and e == 2) else 6.0 / e,
                "lr": 1e-3 * 0.5**e,
            }
        )
    return rows


def _val(seed: int = 0, n: int = 200) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    infected = rng.integers(0, 2, size=n)
    prob = np.clip(0.35 * infected + rng.uniform(0, 0.65, size=n), 0, 1)
    time_true = rng.uniform(0, 48, size=n)
    time_pred = time_true + rng.normal(0, 3, size=n)
    time_mask = rng.uniform(size=n) < 0.8
    return {
        "infected": infected,
        "prob": prob,
        "time_true": np.where(time_mask, time_true, np.nan),
        "time_pred": time_pred,
        "time_mask": time_mask,
    }


def test_learning_curves(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir"
    paths = plot_learning_curves(_history(), out)
    assert paths == [out / "learning_curves.png"]
    assert_png(paths[0])


def test_learning_curves_single_epoch_and_empty(tmp_path: Path) -> None:
    paths = plot_learning_curves([{"epoch": 1, "train_total_loss": 0.5}], tmp_path)
    assert_png(paths[0], min_px=200)
    assert plot_learning_curves([], tmp_path / "empty") == []
    assert plot_learning_curves([{"epoch": 1, "val_cls_auc": None}], tmp_path / "none") == []
    assert not (tmp_path / "empty" / "learning_curves.png").exists()


@pytest.mark.parametrize("seed", [0, 1])
def test_roc(tmp_path: Path, seed: int) -> None:
    val = _val(seed)
    path = plot_roc(val["infected"], val["prob"], tmp_path / "roc.png")
    assert path == tmp_path / "roc.png"
    assert_png(path)


@pytest.mark.parametrize("label", [0, 1])
def test_roc_single_class_returns_none(tmp_path: Path, label: int) -> None:
    assert plot_roc(np.full(20, label), np.linspace(0, 1, 20), tmp_path / "roc.png") is None
    assert not (tmp_path / "roc.png").exists()
    assert plot_roc(np.array([]), np.array([]), tmp_path / "roc.png") is None


@pytest.mark.parametrize("seed", [0, 3])
def test_roc_points_match_sklearn(seed: int) -> None:
    val = _val(seed)
    prob = np.round(val["prob"], 1)  # ties
    fpr, tpr = _roc_points(val["infected"] == 1, prob)
    ref_fpr, ref_tpr, _ = roc_curve(val["infected"], prob, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)


def test_confusion(tmp_path: Path) -> None:
    val = _val()
    path = plot_confusion(val["infected"], val["prob"], tmp_path / "cm.png", threshold=0.4)
    assert path == tmp_path / "cm.png"
    assert_png(path)


def test_confusion_single_class(tmp_path: Path) -> None:
    assert_png(plot_confusion(np.zeros(10), np.linspace(0, 1, 10), tmp_path / "cm.png"))


def test_time_scatter(tmp_path: Path) -> None:
    val = _val()
    path = plot_time_scatter(
        val["time_true"], val["time_pred"], val["infected"], tmp_path / "ts.png", mask=val["time_mask"]
    )
    assert path == tmp_path / "ts.png"
    assert_png(path)
    # without a mask (all targets known) and with a single class
    n = 50
    t = np.linspace(0, 24, n)
    assert_png(plot_time_scatter(t, t + 1, np.ones(n), tmp_path / "ts1.png"))


def test_time_scatter_no_samples_returns_none(tmp_path: Path) -> None:
    assert plot_time_scatter(np.array([]), np.array([]), np.array([]), tmp_path / "ts.png") is None
    t = np.arange(4.0)
    assert plot_time_scatter(t, t, np.ones(4), tmp_path / "ts.png", mask=np.zeros(4, bool)) is None
    assert not (tmp_path / "ts.png").exists()


def test_non_finite_predictions_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prob"):
        plot_roc(np.array([0, 1]), np.array([0.2, np.nan]), tmp_path / "roc.png")
    with pytest.raises(ValueError, match="time_pred"):
        plot_time_scatter(np.arange(2.0), np.array([1.0, np.inf]), np.array([0, 1]), tmp_path / "ts.png")


ALL_FILES = {"learning_curves.png", "roc.png", "confusion_matrix.png", "time_scatter.png"}


def _names(paths: list[Path]) -> set[str]:
    return {p.name for p in paths}


def test_write_run_plots_full(tmp_path: Path) -> None:
    paths = write_run_plots(tmp_path, _history(), _val())
    assert _names(paths) == ALL_FILES
    assert {p.name for p in (tmp_path / "plots").iterdir()} == ALL_FILES
    for p in paths:
        assert p.parent == tmp_path / "plots"
        assert_png(p)


def test_write_run_plots_without_val(tmp_path: Path) -> None:
    assert _names(write_run_plots(tmp_path, _history(), None)) == {"learning_curves.png"}


def test_write_run_plots_classification_only(tmp_path: Path) -> None:
    val = _val()
    val.pop("time_pred")
    assert _names(write_run_plots(tmp_path, _history(), val)) == {
        "learning_curves.png",
        "roc.png",
        "confusion_matrix.png",
    }
    assert not (tmp_path / "plots" / "time_scatter.png").exists()


def test_write_run_plots_regression_only(tmp_path: Path) -> None:
    val = _val()
    val["prob"] = None  # None counts as missing
    assert _names(write_run_plots(tmp_path, _history(), val)) == {"learning_curves.png", "time_scatter.png"}


def test_write_run_plots_single_class_skips_roc(tmp_path: Path) -> None:
    val = _val()
    val["infected"] = np.zeros_like(val["infected"])
    assert _names(write_run_plots(tmp_path, _history(), val)) == ALL_FILES - {"roc.png"}
