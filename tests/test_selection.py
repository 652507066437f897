"""Model selection: metric direction, ties, early stopping, test scored with best.pt."""

import csv
import json

import pytest

from cellmtl import training
from cellmtl.config import load_config
from cellmtl.training import is_better


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


@pytest.mark.slow
def test_early_stopping_and_best_checkpoint_for_test(monkeypatch, tiny_config):
    """Validation AUC falls after epoch 1: training stops after `patience` epochs and the test split is
    scored with epoch 1's weights."""
    aucs = iter([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    real_validate = training.validate
    calls = {"n": 0}

    def fake_validate(s, ds, loader=None):
        metrics, preds = real_validate(s, ds, loader)
        if ds is s.val_ds and loader is not None:  # the per-epoch validation inside fit()
            metrics["cls_auc"] = next(aucs)
            calls["n"] += 1
        return metrics, preds

    monkeypatch.setattr(training, "validate", fake_validate)
    cfg = load_config(tiny_config, ["training.epochs=6", "training.early_stopping_patience=2",
                                    "data.test_fraction=0.25"])
    run = training.train(cfg)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and calls["n"] == 3
    results = json.loads((run / "results.json").read_text())
    assert results["best_epoch"] == 1 and "test" in results
    import torch

    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["epoch"] == 1
    assert "early stopping" in (run / "train.log").read_text()
    from cellmtl.evaluation import evaluate_run

    best_eval = json.loads(evaluate_run(run, checkpoint="best", split="test").read_text())["metrics"]
    last_eval = json.loads(evaluate_run(run, checkpoint="last", split="test").read_text())["metrics"]
    assert best_eval == pytest.approx(results["test"])
    assert last_eval != pytest.approx(results["test"])
