"""multitask.time_head / uninfected_time / regression_loss / weighting and data.temporal_context_hours:
the science by hand, then one tiny training per combination of options."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import yaml

from cellmtl.checkpoints import Checkpoint
from cellmtl.config import config_from_dict, load_config
from cellmtl.data.dataset import context_frames, context_offsets
from cellmtl.data.targets import time_targets
from cellmtl.errors import BadInputError
from cellmtl.losses import MultiTaskLoss, gaussian_nll
from cellmtl.metrics import interval_coverage
from cellmtl.models import ModelSpec, MultiTaskNet
from cellmtl.weighting import dwa_weights, gradnorm_targets, kendall_total

from .conftest import write_config


def test_uninfected_time_policies_by_hand():
    hours = np.array([0.0, 1.0, 2.0])
    assert time_targets(hours, False, None, uninfected_time="zero")[0].tolist() == [0, 0, 0]
    assert np.isnan(time_targets(hours, False, None, uninfected_time="ignore")[0]).all()
    # pre-onset frames relabelled uninfected follow the same policy; infected frames keep hours since onset
    t, label, _ = time_targets(hours, True, 1.0, "as_uninfected", uninfected_time="zero")
    assert t.tolist() == [0.0, 0.0, 1.0] and label.tolist() == [0, 1, 1]
    with pytest.raises(ValueError):
        time_targets(hours, False, None, uninfected_time="never")


def test_per_class_loss_uses_true_class_and_prediction_uses_predicted_class():
    out = {"infected": torch.tensor([3.0, 3.0]), "time_per_class": torch.tensor([[0.0, 10.0], [5.0, 0.0]])}
    out["time"] = out["time_per_class"][:, 1]  # what the model reports: the predicted (infected) class's
    loss = MultiTaskLoss()(out, torch.tensor([1.0, 0.0]), torch.tensor([10.0, 5.0]), torch.tensor([True, True]))
    assert loss["reg"].item() == 0.0  # true classes' columns hit both targets exactly
    m = MultiTaskNet(ModelSpec("resnet18", 2, "multitask", head_hidden=8, time_head="per_class")).eval()
    o = m(torch.rand(3, 2, 32, 32))
    col = (o["infected"] >= 0).long()
    torch.testing.assert_close(o["time"], o["time_per_class"][torch.arange(3), col])


def test_conditioned_head_sees_a_detached_logit():
    m = MultiTaskNet(ModelSpec("resnet18", 1, "multitask", head_hidden=8, time_head="conditioned"))
    o = m(torch.rand(2, 1, 32, 32))
    o["time"].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in m.cls_head.parameters())


def test_gaussian_nll_and_coverage_by_hand():
    v = gaussian_nll(torch.tensor([1.0]), torch.tensor([math.log(4.0)]), torch.tensor([3.0]))
    assert v.item() == pytest.approx(0.5 * (math.log(4.0) + 1.0), rel=1e-6)
    # interval +/- 1.645 * std: |err| 1 <= 1.645 (in), 2 > 1.645 (out), NaN target ignored
    cov = interval_coverage(np.array([1.0, 2.0, np.nan]), np.zeros(3), np.ones(3))
    assert cov == pytest.approx(0.5)
    assert interval_coverage(np.array([np.nan]), np.zeros(1), np.ones(1)) is None


def test_kendall_total_by_hand():
    total = kendall_total(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(math.log(2.0)), torch.tensor(0.0))
    assert total.item() == pytest.approx(0.5 * 2 + 0.5 * 1 * 3 + 0.5 * math.log(2.0), rel=1e-6)


def test_dwa_weights_by_hand():
    assert dwa_weights([[1.0, 2.0]]) == [1.0, 1.0]
    w = dwa_weights([[1.0, 2.0], [0.5, 2.0]], temperature=2.0)  # ratios 0.5 and 1.0
    e1, e2 = math.exp(0.25), math.exp(0.5)
    assert w == pytest.approx([2 * e1 / (e1 + e2), 2 * e2 / (e1 + e2)]) and sum(w) == pytest.approx(2.0)


def test_gradnorm_targets_by_hand():
    t = gradnorm_targets(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0]), 1.5)
    r = np.array([0.5, 1.0]) / 0.75  # relative inverse training rates
    np.testing.assert_allclose(t.numpy(), 2.0 * r**1.5, rtol=1e-6)


def test_context_frames_clamp_to_the_stack():
    assert context_offsets([-6, -3, 0], 1.5) == [-4, -2, 0]
    assert context_frames(1, [-4, -2, 0], 10) == [0, 0, 1]
    assert context_frames(9, [0, 3], 10) == [9, 9]


@pytest.mark.parametrize("raw, needle", [
    ({"task": {"mode": "classification"}, "multitask": {"weighting": "dwa"}}, "multitask.weighting"),
    ({"task": {"mode": "regression"}, "multitask": {"time_head": "per_class"}}, "multitask.time_head"),
    ({"multitask": {"time_head": "both"}}, "multitask.time_head"),
    ({"multitask": {"regression_loss": "huber"}}, "multitask.regression_loss"),
    ({"data": {"manifest": "m.csv", "temporal_context_hours": []}}, "data.temporal_context_hours"),
])
def test_bad_option_names_key(raw, needle):
    raw = {"data": {"manifest": "m.csv"}, **raw}
    with pytest.raises(BadInputError, match=needle.replace(".", r"\.")):
        config_from_dict(raw)


COMBOS = [
    {"multitask": {"time_head": "per_class", "regression_loss": "gaussian_nll", "uninfected_time": "zero",
                   "weighting": "uncertainty"}, "data": {"temporal_context_hours": [-2, 0]}},
    {"multitask": {"time_head": "conditioned", "regression_loss": "l1", "uninfected_time": "ignore",
                   "weighting": "dwa"}},
    {"multitask": {"regression_loss": "mse", "weighting": "gradnorm"}},
]


@pytest.mark.parametrize("sections", COMBOS, ids=["per_class-nll-zero-uncertainty-context", "conditioned-l1-ignore-dwa",
                                                  "mse-gradnorm"])
@pytest.mark.slow
def test_options_train_an_epoch_and_are_recorded(sections, tmp_path, tiny_experiment):
    from cellmtl.training.run import train
    from cellmtl.training.state import setup

    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_experiment, training={"epochs": 1}, **sections)
    run = train(load_config(cfg_path))
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    for section, values in sections.items():
        for k, v in values.items():
            assert recorded[section][k] == v
    ckpt = Checkpoint.load(run / "checkpoints" / "last.pt")
    m = sections["multitask"]
    assert ckpt.model_spec.time_head == m.get("time_head", "shared")
    assert ckpt.model_spec.time_nll == (m["regression_loss"] == "gaussian_nll")
    assert ckpt.resume.weighting["name"] == m["weighting"]
    assert ckpt.temporal_context_hours == sections.get("data", {}).get("temporal_context_hours")
    row = next(csv.DictReader((run / "metrics.csv").open()))
    assert float(row["weight_cls"]) > 0 and float(row["weight_reg"]) > 0
    if "data" in sections:  # one combination suffices (and keeps the suite fast): predict and evaluate
        check_predict_evaluate(run, tmp_path, tiny_experiment, m)
    # --resume restores the weighting's state
    s = setup(None, resume=run)
    try:
        restored, saved = s.weighting.state_dict(), ckpt.resume.weighting
        assert restored.keys() == saved.keys()
        for k, v in saved.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(restored[k], v)
            elif k != "opt":
                assert restored[k] == v
    finally:
        from cellmtl.training.rundir import close_logger

        close_logger(s.logger)


def check_predict_evaluate(run, tmp_path, manifest, m):
    """predict, evaluate and export rebuild the same input and head from the checkpoint alone."""
    import json

    from cellmtl.evaluation.evaluate import evaluate_run
    from cellmtl.export.bioimageio import export_bioimageio
    from cellmtl.export.onnx import export_onnx
    from cellmtl.predict import predict

    out = predict(run / "checkpoints" / "best.pt", out=tmp_path / "pred.csv", manifest=manifest, progress=False)
    header = out.open().readline().strip().split(",")
    assert ("pred_time_std" in header) == (m["regression_loss"] == "gaussian_nll")
    metrics = json.loads(evaluate_run(run).read_text())["metrics"]
    assert ("reg_coverage90" in metrics) == (m["regression_loss"] == "gaussian_nll")
    onnx_path = export_onnx(run / "checkpoints" / "best.pt", tmp_path / "m.onnx")
    assert onnx_path.is_file()
    with pytest.raises(BadInputError, match="temporal_context_hours"):  # bioimage.io takes one image
        export_bioimageio(run / "checkpoints" / "best.pt", tmp_path / "m.zip")
