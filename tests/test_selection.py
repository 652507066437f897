"""Model selection: metric direction, ties, early stopping, test scored with best.pt."""

import csv
import json

import pytest

from cellmtl.config import load_config
from cellmtl.training import loop
from cellmtl.training.run import train
from cellmtl.training.selection import is_better, selection_hint, time_head_note


def test_direction_is_inferred():
    assert is_better({"cls_auc": 0.9}, {"cls_auc": 0.8}, "cls_auc")
    assert not is_better({"cls_auc": 0.7}, {"cls_auc": 0.8}, "cls_auc")
    assert is_better({"reg_mae": 2.0}, {"reg_mae": 3.0}, "reg_mae")
    assert not is_better({"reg_mae": 4.0}, {"reg_mae": 3.0}, "reg_mae")
    assert is_better({"cls_auc": 0.5}, None, "cls_auc")
    assert not is_better({"cls_auc": None}, {"cls_auc": 0.5}, "cls_auc")


def test_ties_go_to_lower_loss():
    best = {"cls_auc": 1.0, "total_loss": 0.5}
    assert is_better({"cls_auc": 1.0, "total_loss": 0.4}, best, "cls_auc")
    assert not is_better({"cls_auc": 1.0, "total_loss": 0.6}, best, "cls_auc")


def test_selection_hint_names_an_epoch_with_a_much_better_time_head():
    """AUC picks epoch 1 (MAE 5 h) while epoch 3 reached 2 h: the log says so; no note when the gap is small,
    when selecting by a time metric or by the loss, or without a time head."""
    hist = [{"val_cls_auc": 1.0, "val_reg_mae": 5.0}, {"val_cls_auc": 0.99, "val_reg_mae": 3.5},
            {"val_cls_auc": 0.98, "val_reg_mae": 2.0}]
    note = selection_hint(hist, 1, "cls_auc")
    assert note is not None and "epoch 3" in note and "2.00 h" in note and "cls_auc 0.980" in note
    assert "total_loss" in note
    assert selection_hint(hist, 3, "cls_auc") is None  # best.pt already has the lowest error
    close = [{"val_cls_auc": 1.0, "val_reg_mae": 5.0}, {"val_cls_auc": 0.9, "val_reg_mae": 4.6}]
    assert selection_hint(close, 1, "cls_auc") is None  # 0.4 h: under both thresholds
    assert selection_hint(hist, 1, "total_loss") is None and selection_hint(hist, 1, "reg_mae") is None
    no_time = [{"val_cls_auc": 1.0, "val_reg_mae": None}, {"val_cls_auc": 0.9, "val_reg_mae": None}]
    assert selection_hint(no_time, 1, "cls_auc") is None


def test_time_head_note_names_classes_whose_time_is_flat_inside_stacks():
    """A note for each class whose within-stack slope at best.pt is under 0.5, none when both follow the clock
    or the slopes are unknown (no time head, too few frames)."""
    note = time_head_note({"reg_slope_infected": 0.06, "reg_slope_uninfected": 0.9})
    assert note is not None and note.startswith("note: ") and "infected stacks (slope 0.06)" in note
    assert "uninfected" not in note and "est_onset_hour" in note
    both = time_head_note({"reg_slope_infected": -0.2, "reg_slope_uninfected": 0.4})
    assert both is not None and "infected stacks (slope -0.20) and uninfected stacks (slope 0.40)" in both
    assert time_head_note({"reg_slope_infected": 0.8, "reg_slope_uninfected": 1.1}) is None
    assert time_head_note({"reg_slope_infected": None, "reg_slope_uninfected": None}) is None
    assert time_head_note({"cls_auc": 0.9}) is None


@pytest.mark.slow
def test_early_stopping_and_best_checkpoint_for_test(monkeypatch, tiny_config):
    """Validation AUC falls after epoch 1: training stops after `patience` epochs and the test split is
    scored with epoch 1's weights."""
    aucs = iter([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    real_validate = loop.validate
    calls = {"n": 0}

    def fake_validate(s, ds, loader=None, keep_maps=False):
        metrics, preds = real_validate(s, ds, loader, keep_maps)
        if ds is s.val_ds and loader is not None:  # the per-epoch validation inside fit()
            metrics["cls_auc"] = next(aucs)
            calls["n"] += 1
        return metrics, preds

    monkeypatch.setattr(loop, "validate", fake_validate)
    cfg = load_config(tiny_config, ["training.epochs=6", "training.early_stopping_patience=2",
                                    "data.test_fraction=0.25"])
    run = train(cfg)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and calls["n"] == 3
    results = json.loads((run / "results.json").read_text())
    assert results["best_epoch"] == 1 and "test" in results
    import torch

    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["epoch"] == 1
    assert "early stopping" in (run / "train.log").read_text()
    from cellmtl.evaluation.evaluate import evaluate_run

    best_eval = json.loads(evaluate_run(run, checkpoint="best", split="test").read_text())["metrics"]
    last_eval = json.loads(evaluate_run(run, checkpoint="last", split="test").read_text())["metrics"]
    assert best_eval == pytest.approx(results["test"])
    assert last_eval != pytest.approx(results["test"])


def test_time_head_note_recommends_pretrained_weights_unless_the_run_had_them():
    flat = {"reg_slope_infected": 0.06, "reg_slope_uninfected": 0.9}
    scratch = time_head_note(flat)
    assert scratch is not None and "pretrained weights" in scratch and "training.strategy probe" in scratch
    pretrained = time_head_note(flat, pretrained=True)
    assert pretrained is not None and "training.strategy probe" not in pretrained
