"""training.strategy probe and lp_ft: closed-form heads on frozen features, saved as ordinary checkpoints."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cellmtl.checkpoints import Checkpoint
from cellmtl.cli import main
from cellmtl.data.dataset import SampleIndex
from cellmtl.errors import BadInputError
from cellmtl.models import ModelSpec, MultiTaskNet
from cellmtl.training.probe import Standardiser, as_changes, changes_to_frames, fit_heads, stack_folds
from tests.conftest import write_config, write_hyperstack


def cli(capsys, *args: str) -> str:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.strip().splitlines()[-1]


def test_standardiser_folds_back_to_raw_features():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(50, 4))
    std = Standardiser.fit(x)
    coef, icpt = rng.normal(size=(2, 4)), rng.normal(size=2)
    w, b = std.fold(coef, icpt)
    np.testing.assert_allclose(x @ w.T + b, std(x) @ coef.T + icpt)


def test_coefficients_on_changes_fold_back_to_the_concatenated_frames():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 3 * 4))  # 3 context frames of 4 features, oldest first
    z = as_changes(x, 3)
    np.testing.assert_allclose(z[:, :4], x[:, 8:])  # the current frame first
    np.testing.assert_allclose(z[:, 4:8], x[:, 8:] - x[:, :4])  # then its change since the oldest
    w = rng.normal(size=(2, 12))
    np.testing.assert_allclose(x @ changes_to_frames(w, 3).T, z @ w.T)
    assert as_changes(x, 1) is x and changes_to_frames(w, 1) is w


def test_probe_with_context_finds_an_infection_seen_only_as_change():
    """Each well has its own level of feature 0 (wider than the effect); infected frames have moved up since the
    context frame. The infection head, fitted on changes and folded back onto the concatenated features the
    network's head reads, separates the classes."""
    rng = np.random.default_rng(4)
    n_stacks, per, width = 8, 10, 512
    stack = np.repeat(np.arange(n_stacks), per)
    infected = (stack % 2).astype(np.int8)
    older = np.zeros((len(stack), width), np.float32)
    older[:, :4] = rng.normal(scale=0.3, size=(len(stack), 4))
    older[:, 0] += rng.normal(scale=3.0, size=n_stacks)[stack]
    current = older.copy()
    current[:, :4] += rng.normal(scale=0.3, size=(len(stack), 4))
    current[:, 0] += 1.5 * infected
    feats = np.concatenate([older, current], axis=1)
    hours = np.tile(np.arange(per, dtype=np.float32), n_stacks)
    index = SampleIndex(stack.astype(np.int32), np.tile(np.arange(per), n_stacks).astype(np.int32), hours,
                        infected, hours)
    model = MultiTaskNet(ModelSpec("resnet18", 2, "multitask", head_hidden=0, context_frames=2,
                                   temporal_fusion="features")).eval()
    model.set_time_scaling(5.0, 3.0)
    fit_heads(model, feats, index)
    w = model.cls_head[-1].weight.detach().numpy()[0]
    assert w[0] * w[width] < 0  # the change of feature 0: opposite signs on the older and the current frame
    with torch.no_grad():
        logit = model.heads(torch.from_numpy(feats))["infected"].numpy().ravel()
    assert ((logit > 0) == (infected == 1)).mean() > 0.95


def test_stack_folds_keep_stacks_whole_and_both_classes():
    groups = np.repeat(np.arange(8), 5)
    labels = (groups % 2).astype(int)
    folds = stack_folds(groups, labels)
    assert folds is not None and len(folds) == 4
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te]) and set(labels[tr]) == {0, 1}
    assert stack_folds(np.array([0, 0, 1, 1])) is None  # too few stacks: a fixed strength


def test_fit_heads_recovers_a_linear_truth_per_class():
    """Time = a different linear function of the features per class; the per_class head fits each exactly (up to
    the ridge's shrinkage) and the classifier separates the classes."""
    rng = np.random.default_rng(1)
    n_stacks, per = 8, 12
    stack = np.repeat(np.arange(n_stacks), per)
    infected = (stack % 2).astype(np.int8)
    feats = np.zeros((len(stack), 512), np.float32)  # resnet18's width; constant features carry nothing
    feats[:, :6] = rng.normal(size=(len(stack), 6))
    feats[:, 0] += 4.0 * infected  # the class is visible in feature 0
    hours = np.where(infected == 1, 2.0 * feats[:, 1] + 5.0, -1.5 * feats[:, 2] + 10.0).astype(np.float32)
    index = SampleIndex(stack.astype(np.int32), np.tile(np.arange(per), n_stacks).astype(np.int32),
                        hours, infected, hours)
    model = MultiTaskNet(ModelSpec("resnet18", 1, "multitask", head_hidden=0, time_head="per_class")).eval()
    model.set_time_scaling(6.0, 3.0)
    fit_heads(model, feats, index)
    with torch.no_grad():
        out = model.heads(torch.from_numpy(feats))
    assert ((out["infected"] > 0).numpy() == (infected == 1)).all()
    pred = model.time_hours(out["time"]).numpy()
    assert np.abs(pred - hours).mean() < 0.3


@pytest.mark.slow
def test_probe_run_end_to_end(capsys, tiny_experiment, tmp_path, imagenet_weights):
    """A probe run writes the usual run folder in a single 'epoch', and its best.pt works in evaluate, predict,
    ONNX and bioimage.io export."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_experiment, model={"name": "mobilenet_v2", "head_hidden": None,
                       "weights": str(imagenet_weights)}, training={"strategy": "probe"},
                       multitask={"time_head": "per_class"})
    run = Path(cli(capsys, "train", "--config", str(cfg)))
    for name in ("checkpoints/best.pt", "checkpoints/last.pt", "metrics.csv", "results.json", "report.html",
                 "predictions_val.csv"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results["best_epoch"] == 1 and results["history_length"] == 1 and results["strategy"] == "probe"
    assert results["best"]["cls_auc"] is not None
    ckpt = Checkpoint.load(run / "checkpoints" / "best.pt")
    spec = ckpt.model_spec
    assert spec.head_hidden == 0 and spec.in_chans == 2 and len(spec.input_mean) == 2
    assert ckpt.resume is None  # best.pt: the model alone
    # the probe's heads, not a random init: they reproduce its val predictions
    with (run / "predictions_val.csv").open() as fh:
        val_preds = list(csv.DictReader(fh))
    assert len({round(float(r["prob_infected"]), 4) for r in val_preds}) > 2
    log = (run / "train.log").read_text()
    assert "probe: linear heads fitted on" in log and "ridge_alpha_infected" in log

    cli(capsys, "evaluate", "--run", str(run))
    assert (run / "evaluation_val.json").is_file()
    pred = tmp_path / "pred.csv"
    cli(capsys, "predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--manifest", str(tiny_experiment),
        "--out", str(pred))
    with pred.open() as fh:
        rows = list(csv.DictReader(fh))
    by_key = {(r["stack_id"], r["frame"]): float(r["prob_infected"]) for r in rows}
    for r in val_preds:  # predict runs the same network as training's validation
        assert by_key[(r["stack_id"], r["frame"])] == pytest.approx(float(r["prob_infected"]), abs=1e-4)
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "m.onnx"
    cli(capsys, "export", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--format", "onnx",
        "--out", str(onnx_path))
    import onnxruntime as ort

    model = ckpt.network()
    x = torch.rand(2, 2, 32, 32)
    prob, _ = ort.InferenceSession(str(onnx_path)).run(None, {"image": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(prob, torch.sigmoid(model(x)["infected"]).numpy(), atol=1e-4)
    cli(capsys, "export", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--format", "bioimageio",
        "--out", str(tmp_path / "pkg"))
    assert (tmp_path / "pkg" / "rdf.yaml").is_file()


@pytest.mark.slow
def test_lp_ft_starts_from_the_probe_and_fine_tunes(capsys, tiny_experiment, tmp_path):
    """lp_ft with a temporal context read by `features` fusion: the probe stage, then the epoch loop."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_experiment, model={"head_hidden": None, "temporal_fusion":
                       "features"}, training={"strategy": "lp_ft", "epochs": 2},
                       data={"temporal_context_hours": [-2, 0]})
    run = Path(cli(capsys, "train", "--config", str(cfg)))
    results = json.loads((run / "results.json").read_text())
    spec = Checkpoint.load(run / "checkpoints" / "best.pt").model_spec
    assert (spec.temporal_fusion, spec.context_frames, spec.in_chans) == ("features", 2, 4)
    assert results["history_length"] == 2 and results["strategy"] == "lp_ft"
    assert "logistic_C" in results["probe"] and "cls_auc" in results["probe"]["val"]
    ckpt = Checkpoint.load(run / "checkpoints" / "last.pt")
    groups = ckpt.resume.optimizer["param_groups"]
    assert [g["name"] for g in groups] == ["backbone", "heads"]
    assert groups[0]["initial_lr"] == pytest.approx(0.1 * groups[1]["initial_lr"])  # backbone_lr_scale 0.1


def test_probe_refuses_hidden_heads(tiny_experiment, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_experiment, training={"strategy": "probe"})  # head_hidden 16
    assert main(["train", "--config", str(cfg)]) == 2
    assert "model.head_hidden must be 0 or null" in capsys.readouterr().err


@pytest.mark.parametrize("rotations", [False, True])
def test_probe_features_of_a_temporal_context_are_computed_once_per_frame(tiny_experiment, tmp_path, rotations):
    """`features` fusion: the probe's per-frame cache gives exactly what the network computes on the stacked
    context images (each frame through the backbone, features concatenated oldest first); with
    model.average_rotations one row per orientation, whose mean is the network's."""
    import functools

    from cellmtl.config import load_config
    from cellmtl.data.dataset import build_normalizer, load_experiment
    from cellmtl.runtime import make_loader
    from cellmtl.training.probe import context_plan, dataset_features
    from cellmtl.training.state import datasets, split_indices

    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_experiment, data={"temporal_context_hours": [-2, 0]},
                                   model={"head_hidden": None, "temporal_fusion": "features"},
                                   training={"strategy": "probe"}))
    exp = load_experiment(cfg)
    indices = split_indices(cfg, exp)
    train_ds = datasets(cfg, exp, indices, build_normalizer(cfg, exp, indices["train"]))[0]
    train_ds.augment_cfg = None  # the probe reads training frames as they are
    model = MultiTaskNet(ModelSpec("resnet18", 4, "multitask", head_hidden=0, context_frames=2,
                                   temporal_fusion="features", average_rotations=rotations)).eval()
    frames, plan = context_plan(train_ds)
    assert plan.shape == (len(train_ds), 2) and len(frames) < 2 * len(train_ds)  # shared frames are read once
    loader = functools.partial(make_loader, batch_size=4, num_workers=0, device=torch.device("cpu"))
    cached = dataset_features(model, train_ds, loader, torch.device("cpu"))
    with torch.no_grad():
        direct = torch.cat([model.features(b["image"]) for b in loader(train_ds)]).numpy()
    assert cached.shape == (len(train_ds), 8 if rotations else 1, 1024)
    np.testing.assert_allclose(cached.mean(1), direct, rtol=1e-4, atol=1e-5)
    if rotations:  # the rows are the orientations' own features, not eight copies of the mean
        assert np.abs(cached[:, 1] - cached[:, 0]).max() > 1e-3


@pytest.mark.parametrize("time_head", ["shared", "conditioned"])
def test_fit_heads_other_time_heads_and_gaussian_nll(time_head):
    """conditioned: the ridge also sees the logit (folded back to the raw logit the head receives); gaussian_nll:
    the log-variance output is the constant cross-validated residual variance."""
    rng = np.random.default_rng(2)
    stack = np.repeat(np.arange(6), 10)
    infected = (stack % 2).astype(np.int8)
    feats = np.zeros((len(stack), 512), np.float32)
    feats[:, :3] = rng.normal(size=(len(stack), 3))
    feats[:, 0] += 3.0 * infected
    hours = (3.0 * feats[:, 1] + 8.0 + rng.normal(scale=0.5, size=len(stack))).astype(np.float32)
    index = SampleIndex(stack.astype(np.int32), np.zeros(len(stack), np.int32), hours, infected, hours)
    model = MultiTaskNet(ModelSpec("resnet18", 1, "multitask", head_hidden=0, time_head=time_head,
                                   time_nll=True)).eval()
    model.set_time_scaling(8.0, 3.0)
    info = fit_heads(model, feats, index)
    assert "ridge_alpha_all" in info
    with torch.no_grad():
        out = model.heads(torch.from_numpy(feats))
    assert np.abs(model.time_hours(out["time"]).numpy() - hours).mean() < 1.0
    logvar = out["time_logvar"].numpy()
    assert np.allclose(logvar, logvar[0]) and np.exp(logvar[0]) * 9.0 < 2.0  # residual variance in h^2, ~0.25


def test_batchnorm_calibration_frames_span_every_training_stack(tiny_experiment, tmp_path):
    """`training.bn_recalibration_samples` below the training frames: the frames it re-estimates BatchNorm on come
    from every training stack, evenly spaced, not the first stacks of the index (which runs stack by stack)."""
    from cellmtl.config import load_config
    from cellmtl.training.loop import calibration_frames, calibration_loader
    from cellmtl.training.state import setup

    assert calibration_frames(5, 8) == [0, 1, 2, 3, 4]
    assert calibration_frames(100, 0) == []
    picked = calibration_frames(100, 10)
    assert len(picked) == len(set(picked)) == 10 and picked[0] == 0 and picked[-1] == 99
    assert max(np.diff(picked)) - min(np.diff(picked)) <= 1

    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_experiment,
                                   training={"bn_recalibration_samples": 12, "batch_size": 4}))
    s = setup(cfg)
    try:
        train_stacks = {s.calib_ds.stack_ids[k] for k in np.unique(s.calib_ds.index.stack)}
        first = {s.calib_ds.stack_ids[k] for k in s.calib_ds.index.stack[:12]}
        assert len(s.calib_ds) > 12 and len(first) < len(train_stacks) == 6  # the first 12 frames miss stacks
        seen = [sid for batch in calibration_loader(s) for sid in batch["stack_id"]]
        assert len(seen) == 12 and set(seen) == train_stacks
        assert sum(len(b["stack_id"]) for b in calibration_loader(s, drop_last=True)) == 12  # 3 full batches
        s.cfg.training.bn_recalibration_samples = 0
        assert calibration_loader(s) is None  # off: recalibrate_batchnorm leaves the statistics as they are
    finally:
        from cellmtl.training.rundir import close_logger

        close_logger(s.logger)


def test_average_rotations_gives_features_that_do_not_depend_on_orientation():
    torch.manual_seed(0)
    x = torch.rand(3, 2, 32, 32)
    turned = [torch.rot90(x, 1, (2, 3)), x.flip(3), torch.rot90(x, 3, (2, 3)).flip(2)]
    plain = MultiTaskNet(ModelSpec("resnet18", 2, "multitask", head_hidden=0)).eval()
    averaged = MultiTaskNet(ModelSpec("resnet18", 2, "multitask", head_hidden=0, average_rotations=True)).eval()
    averaged.load_state_dict(plain.state_dict())
    with torch.no_grad():
        ref = averaged.features(x)
        for t in turned:
            torch.testing.assert_close(averaged.features(t), ref, atol=1e-5, rtol=1e-4)
        assert (plain.features(turned[0]) - plain.features(x)).abs().max() > 1e-3  # without it they differ
    with pytest.raises(BadInputError, match="square"):
        averaged.features(torch.rand(1, 2, 32, 48))
    with pytest.raises(BadInputError, match="average_rotations"):
        averaged.feature_layer()  # Grad-CAM needs one backbone pass


@pytest.mark.slow
def test_probe_with_average_rotations_predicts_a_turned_stack_alike_and_exports(capsys, tiny_experiment, tmp_path):
    """model.average_rotations through the product: a probe run with temporal context (features fusion) predicts
    the same for every stack turned by 90 degrees as for the original, and its ONNX export gives the network's
    output."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_experiment,
                       model={"head_hidden": None, "temporal_fusion": "features", "average_rotations": True},
                       training={"strategy": "probe"}, data={"temporal_context_hours": [-2, 0]})
    run = Path(cli(capsys, "train", "--config", str(cfg)))
    ckpt = Checkpoint.load(run / "checkpoints" / "best.pt")
    assert ckpt.model_spec.average_rotations and ckpt.model_spec.feature_frames == 2
    assert "frozen-feature frames in 8 orientations each" in (run / "train.log").read_text()
    turned = tmp_path / "turned"
    for tif in (tmp_path / "stacks").glob("*.tif"):
        write_hyperstack(turned / "stacks" / tif.name, np.ascontiguousarray(np.rot90(tifffile.imread(tif), 1,
                                                                                     (2, 3))))
    (turned / "manifest.csv").write_text(tiny_experiment.read_text())
    tables = []
    for manifest in (tiny_experiment, turned / "manifest.csv"):
        out = tmp_path / f"{manifest.parent.name}.csv"
        cli(capsys, "predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--manifest", str(manifest),
            "--out", str(out))
        with out.open() as fh:
            tables.append(list(csv.DictReader(fh)))
    assert len(tables[0]) == len(tables[1]) == 48
    for a, b in zip(*tables, strict=True):
        assert (a["stack_id"], a["frame"]) == (b["stack_id"], b["frame"])
        for key in ("prob_infected", "pred_time_hours"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-4), (key, a, b)
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    onnx_path = tmp_path / "m.onnx"
    cli(capsys, "export", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--format", "onnx",
        "--out", str(onnx_path))
    x = torch.rand(2, 4, 32, 32)
    prob, *_ = ort.InferenceSession(str(onnx_path)).run(None, {"image": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(prob, torch.sigmoid(ckpt.network()(x)["infected"]).numpy(), atol=1e-4)
