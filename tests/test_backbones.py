"""Backbone factory, starting weights (model.weights / the offline ImageNet fixture) and pretrained input handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cellmtl.backbones import (
    check_imagenet_statistics,
    create_trunk,
    load_trunk_weights,
    rename_by_position,
    torchvision_trunk,
)
from cellmtl.checkpoints import Checkpoint
from cellmtl.cli import main
from cellmtl.errors import BadInputError
from cellmtl.models import ModelSpec, MultiTaskNet
from tests.conftest import write_config


@pytest.mark.parametrize("name, n_features", [("resnet18", 512), ("mobilenet_v2", 1280),
                                              ("mobilenet_v3_small", 1024), ("efficientnet_b0", 1280),
                                              ("convnext_tiny", 768), ("regnet_x_400mf", 400)])
def test_factory_builds_families_on_any_channel_count(name, n_features):
    m = MultiTaskNet(ModelSpec(name, 2, "multitask", head_hidden=0, time_head="per_class")).eval()
    assert m.n_features == n_features
    out = m(torch.rand(2, 2, 64, 64))
    assert out["infected"].shape == (2,) and out["time_per_class"].shape == (2, 2)
    stem = next(mod for mod in m.backbone.modules() if isinstance(mod, torch.nn.Conv2d))
    assert stem.in_channels == 2
    assert m.feature_layer() is not None


def test_head_hidden_zero_is_one_linear_layer():
    m = MultiTaskNet(ModelSpec("resnet18", 1, "multitask", head_hidden=0))
    assert [type(x).__name__ for x in m.cls_head] == ["Dropout", "Linear"]


def test_load_trunk_weights_adapts_the_stem_and_names_the_first_bad_key():
    _, trunk = torchvision_trunk("resnet18")
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in trunk.module.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)  # the removed classifier: skipped
    target, _ = torchvision_trunk("resnet18")
    fresh = create_trunk("resnet18")
    from cellmtl.backbones import adapt_stem

    adapt_stem(fresh.module, 5)
    load_trunk_weights(fresh, state, "f.pt")
    torch.testing.assert_close(fresh.module.conv1.weight[:, 3], state["conv1.weight"][:, 0] * 0.6)
    torch.testing.assert_close(fresh.module.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    bad = dict(state)
    bad["layer2.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(BadInputError, match=r"f.pt: key 'layer2.0.conv1.weight' has shape \[3, 3, 3, 3\]"):
        load_trunk_weights(fresh, bad, "f.pt")
    extra = dict(state, **{"head.extra": torch.zeros(1)})
    with pytest.raises(BadInputError, match="key 'head.extra' is not part of this model"):
        load_trunk_weights(fresh, extra, "f.pt")


def test_rename_by_position_checks_every_shape():
    src = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    out = rename_by_position(src, {"x.0.weight": (2, 3), "x.0.bias": (2,)}, "src")
    assert list(out) == ["x.0.weight", "x.0.bias"]
    with pytest.raises(ValueError, match="'a.bias' has shape \\[2\\], 'x.0.bias' needs \\[3\\]"):
        rename_by_position(src, {"x.0.weight": (2, 3), "x.0.bias": (3,)}, "src")
    with pytest.raises(ValueError, match="2 tensors, the model has 1"):
        rename_by_position(src, {"x.0.weight": (2, 3)}, "src")


def test_the_imagenet_fixture_is_trained_mobilenet_v2_features(imagenet_weights):
    state = torch.load(imagenet_weights, weights_only=True)
    model, trunk = torchvision_trunk("mobilenet_v2")
    assert set(state) == {k for k in model.state_dict() if k.startswith("features.")}
    load_trunk_weights(trunk, state, str(imagenet_weights))
    torch.testing.assert_close(model.features[18][1].running_var, state["features.18.1.running_var"])
    check_imagenet_statistics(state, "fixture")  # trained: BN statistics moved, colour-consistent filters
    with pytest.raises(ValueError, match="not trained weights"):
        check_imagenet_statistics(torchvision_trunk("mobilenet_v2")[0].state_dict(), "random")
    # Trained BatchNorm statistics describe the activations of natural-looking images (1/f noise) far better
    # than a random network's do: the median |log(batch var / running var)| over layers is small.
    gen = torch.Generator().manual_seed(0)
    f = torch.fft.fftfreq(96)
    amp = 1 / torch.clamp((f[:, None] ** 2 + f[None, :] ** 2).sqrt(), min=1 / 96)
    img = torch.fft.ifft2(amp * torch.exp(2j * torch.pi * torch.rand(8, 3, 96, 96, generator=gen))).real
    img = (img - img.mean((2, 3), keepdim=True)) / img.std((2, 3), keepdim=True)
    ratios = []

    def hook(mod, inp, _out):
        ratios.append(float((inp[0].var((0, 2, 3)) / (mod.running_var + 1e-5)).log().abs().median()))

    hooks = [b.register_forward_hook(hook) for b in model.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model.eval()(img)
    for h in hooks:
        h.remove()
    assert float(np.median(ratios)) < 3.0  # a random init with these statistics gives ~25


def test_model_weights_wrong_shape_exits_2_naming_file_and_key(tmp_path, tiny_experiment, capsys):
    bad = {k: v for k, v in torchvision_trunk("resnet34")[0].state_dict().items()}
    path = tmp_path / "resnet34.pt"
    torch.save(bad, path)
    cfg = write_config(tmp_path / "cfg.yaml", tiny_experiment, model={"weights": str(path)})
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.weights ") and str(path) in err[0]
    assert "key 'layer1.2.conv1.weight'" in err[0] and "Traceback" not in err[0]
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    cfg = write_config(tmp_path / "cfg2.yaml", tiny_experiment, model={"weights": str(junk)})
    assert main(["train", "--config", str(cfg)]) == 2
    assert str(junk) in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_starts_from_a_cellmtl_checkpoint(tmp_path, tiny_experiment, capsys):
    cfg = write_config(tmp_path / "a.yaml", tiny_experiment, training={"epochs": 1})
    assert main(["train", "--config", str(cfg)]) == 0
    first = Path(capsys.readouterr().out.strip().splitlines()[-1]) / "checkpoints" / "best.pt"
    old = Checkpoint.load(first).model
    # zero epochs of learning would be the same weights; one epoch at a tiny lr must start from them and stay close
    cfg2 = write_config(tmp_path / "b.yaml", tiny_experiment, model={"weights": str(first)},
                        training={"epochs": 1, "bn_recalibration_samples": 0}, optimizer={"lr": 1e-9})
    assert main(["train", "--config", str(cfg2)]) == 0
    second = Path(capsys.readouterr().out.strip().splitlines()[-1]) / "checkpoints" / "best.pt"
    new = Checkpoint.load(second).model
    for key in ("backbone.layer3.0.conv1.weight", "cls_head.3.weight", "time_head.0.weight"):
        torch.testing.assert_close(new[key], old[key], atol=1e-6, rtol=0)
    fresh = MultiTaskNet(ModelSpec("resnet18", 2, "multitask", head_hidden=16)).state_dict()
    assert not torch.allclose(fresh["backbone.layer3.0.conv1.weight"], new["backbone.layer3.0.conv1.weight"])
    # a checkpoint of another backbone does not fit: exit 2 naming the file and what differs
    cfg3 = write_config(tmp_path / "c.yaml", tiny_experiment, model={"weights": str(first), "name": "resnet34"})
    assert main(["train", "--config", str(cfg3)]) == 2
    err = capsys.readouterr().err
    assert str(first) in err and "name is 'resnet18'" in err


@pytest.mark.slow
def test_pretrained_input_statistics_are_in_the_checkpoint_and_the_onnx_graph(tmp_path, tiny_experiment,
                                                                             imagenet_weights, capsys):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    cfg = write_config(tmp_path / "cfg.yaml", tiny_experiment, model={"name": "mobilenet_v2", "weights":
                       str(imagenet_weights), "head_hidden": None}, training={"strategy": "probe"})
    assert main(["train", "--config", str(cfg)]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    ckpt = Checkpoint.load(run / "checkpoints" / "best.pt")
    spec = ckpt.model_spec
    assert spec.input_mean == pytest.approx([0.485, 0.456]) and spec.input_std == pytest.approx([0.229, 0.224])
    model = ckpt.network()
    x = torch.rand(3, 2, 32, 32)
    with torch.no_grad():
        ref = model(x)
        # the statistics are applied inside forward: without them the backbone sees other values
        plain = model.heads(model.backbone(x))
    assert not torch.allclose(ref["infected"], plain["infected"])
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--format", "onnx",
                 "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out))
    prob, hours = sess.run(None, {"image": x.numpy()})
    np.testing.assert_allclose(prob, torch.sigmoid(ref["infected"]).numpy(), atol=1e-4)
    np.testing.assert_allclose(hours, model.time_hours(ref["time"]).numpy(), atol=1e-3)
    meta = {p.key: p.value for p in __import__("onnx").load(str(out)).metadata_props}
    assert json.loads(meta["cellmtl.input_mean"]) == pytest.approx([0.485, 0.456])


def test_timm_models_and_their_state_dicts(tmp_path):
    timm = pytest.importorskip("timm")
    m = MultiTaskNet(ModelSpec("timm:mobilenetv3_small_050", 3, "multitask", head_hidden=0)).eval()
    assert m.family == "timm" and m.n_features == 1024  # the width after timm's pre-logits layer
    assert m(torch.rand(2, 3, 64, 64))["infected"].shape == (2,)
    # a state dict saved from timm (classifier included) loads under timm's names; its stem is adapted
    state = timm.create_model("resnet18", num_classes=1000).state_dict()
    trunk = create_trunk("timm:resnet18")
    from cellmtl.backbones import adapt_stem

    adapt_stem(trunk.module, 1)
    load_trunk_weights(trunk, state, "timm.pt")
    torch.testing.assert_close(trunk.module.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


def test_checkpoints_from_before_the_factory_still_load():
    """A ResNet checkpoint's model_spec from before this change has only the first seven fields, and its state dict
    the same keys as now (no input statistics: they are not persistent buffers)."""
    m = MultiTaskNet(ModelSpec("resnet18", 2, "multitask", head_hidden=16, time_head="per_class")).eval()
    old_spec = {k: v for k, v in m.spec.to_dict().items()
                if k in ("name", "in_chans", "mode", "dropout", "head_hidden", "time_head", "time_nll")}
    assert not any("input_" in k for k in m.state_dict())
    again = MultiTaskNet(ModelSpec.from_dict(old_spec))
    again.load_state_dict(m.state_dict())
    again.eval()
    x = torch.rand(2, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x)["time_per_class"], m(x)["time_per_class"])
