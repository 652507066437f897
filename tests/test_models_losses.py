import math

import pytest
import torch
import torch.nn.functional as F

from cellmtl.checkpoints import Checkpoint
from cellmtl.config import config_from_dict
from cellmtl.errors import BadInputError
from cellmtl.losses import MultiTaskLoss
from cellmtl.models import ModelSpec, MultiTaskNet, adapt_conv_weight
from cellmtl.weighting import fixed_weights, weighted_total, weighting_from_config


@pytest.mark.parametrize("mode, keys", [("multitask", {"infected", "time"}), ("classification", {"infected"}),
                                        ("regression", {"time"})])
def test_forward_returns_dict_by_task(mode, keys):
    m = MultiTaskNet(ModelSpec("resnet18", 3, mode, head_hidden=16)).eval()
    out = m(torch.rand(2, 3, 32, 32))
    assert set(out) == keys and all(v.shape == (2,) for v in out.values())


def test_first_conv_takes_any_channel_count():
    for c in (1, 2, 4, 7):
        m = MultiTaskNet(ModelSpec("resnet18", c, "multitask", head_hidden=8)).eval()
        assert m.backbone.conv1.in_channels == c
        assert m(torch.rand(1, c, 32, 32))["infected"].shape == (1,)


def test_adapt_conv_weight_like_timm():
    # float64 and an own generator: in float32 the two convolutions round differently by up to ~3e-5, so
    # whether they matched depended on the weights the global RNG happened to draw after earlier tests
    w = torch.randn(4, 3, 7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(adapt_conv_weight(w, 1), w.sum(1, keepdim=True))
    w2 = adapt_conv_weight(w, 2)
    torch.testing.assert_close(w2, w[:, :2] * 1.5)
    w5 = adapt_conv_weight(w, 5)
    torch.testing.assert_close(w5, torch.cat([w, w[:, :2]], 1) * 0.6)
    # a constant image gives the same response as RGB: activations keep their magnitude
    x3, x5 = torch.ones(1, 3, 7, 7, dtype=w.dtype), torch.ones(1, 6, 7, 7, dtype=w.dtype)
    torch.testing.assert_close(F.conv2d(x3, w), F.conv2d(x5, adapt_conv_weight(w, 6)))


def test_time_scaling_round_trip():
    m = MultiTaskNet(ModelSpec("resnet18", 1, "multitask", head_hidden=8))
    m.set_time_scaling(10.0, 4.0)
    h = torch.tensor([2.0, 10.0, 30.0])
    torch.testing.assert_close(m.time_hours(m.scale_time(h)), h)
    assert set(m.state_dict()) >= {"time_shift", "time_scale"}


def test_unknown_backbone_is_bad_input():
    with pytest.raises(BadInputError, match="model.name 'resnet19' is not a torchvision classification model"):
        MultiTaskNet(ModelSpec("resnet19", 2, "multitask"))


def test_pretrained_offline_names_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torch.hub

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(BadInputError) as exc:
        MultiTaskNet(ModelSpec("resnet18", 2, "multitask"), pretrained=True)
    msg = str(exc.value)
    assert "resnet18" in msg and "https://" in msg and str(tmp_path) in msg


def test_loss_by_hand():
    out = {"infected": torch.tensor([0.0, 2.0]), "time": torch.tensor([0.5, 3.0])}
    infected = torch.tensor([1.0, 0.0])
    t = torch.tensor([0.0, 0.0])
    has = torch.tensor([True, False])
    loss = MultiTaskLoss()(out, infected, t, has)
    bce = (math.log(2) + (2 + math.log1p(math.exp(-2)))) / 2
    sl1 = 0.5 * 0.5**2  # only the first sample has a time target
    assert set(loss) == {"cls", "reg"}  # the task terms only: weighting combines them, in one place
    assert loss["cls"].item() == pytest.approx(bce, rel=1e-5)
    assert loss["reg"].item() == pytest.approx(sl1, rel=1e-5)
    cfg = config_from_dict({"data": {"manifest": "m.csv"}, "multitask": {"classification_weight": 2.0,
                                                                          "regression_weight": 3.0}})
    assert fixed_weights(cfg) == (2.0, 3.0)
    assert weighting_from_config(cfg).combine(loss, None).item() == pytest.approx(2 * bce + 3 * sl1, rel=1e-5)
    only_cls = MultiTaskLoss()({"infected": out["infected"]}, infected, t, has)
    cls_cfg = cfg.model_copy(update={"task": cfg.task.model_copy(update={"mode": "classification"})})
    assert fixed_weights(cls_cfg) == (2.0, 0.0) and only_cls["reg"].item() == 0.0
    assert weighted_total(only_cls, *fixed_weights(cls_cfg)).item() == pytest.approx(2 * bce, rel=1e-5)
    negative = MultiTaskLoss()({"infected": torch.tensor([-3.0, -1.0])}, infected, t, has)
    assert str(negative["reg"].item()) == "0.0"  # not "-0.0" in metrics.csv and comparison.csv


def test_loss_without_time_targets_is_finite_and_pos_weight():
    out = {"infected": torch.tensor([0.0]), "time": torch.tensor([5.0])}
    loss = MultiTaskLoss()(out, torch.tensor([1.0]), torch.tensor([float("nan")]), torch.tensor([False]))
    assert loss["reg"].item() == 0.0 and math.isfinite(loss["cls"].item())
    weighted = MultiTaskLoss(pos_weight=3.0)(out, torch.tensor([1.0]), torch.zeros(1), torch.tensor([False]))
    assert weighted["cls"].item() == pytest.approx(3 * math.log(2), rel=1e-5)


def test_checkpoint_round_trip_atomic_and_weights_only(tmp_path):
    from cellmtl.data.transforms import Normalizer

    m = MultiTaskNet(ModelSpec("resnet18", 2, "multitask", head_hidden=8))
    cfg = config_from_dict({"data": {"manifest": "m.csv", "tile_size": 64}})
    ckpt = Checkpoint(model=m.state_dict(), model_spec=m.spec, config=cfg, normalizer=Normalizer("per_image", (1, 99)),
                      channels=(0, 1), channel_names=("DAPI", "GFP"), channel_luts=None, splits={"a": "train"},
                      epoch=3, run_id="r", metrics={"cls_auc": None})
    path = tmp_path / "c" / "best.pt"
    ckpt.save(path)
    ckpt.save(path)  # overwrite in place
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp or previous files left
    raw = torch.load(path, weights_only=True)
    assert "image_size" not in raw and "tiles" not in raw and "time_shift" not in raw  # each field once
    loaded = Checkpoint.load(path)
    assert (loaded.channels, loaded.channel_names, loaded.epoch, loaded.input_size) == ((0, 1), ("DAPI", "GFP"), 3, 64)
    assert loaded.tiles.size == 64 and loaded.resume is None and loaded.model_spec == m.spec
    path.write_bytes(b"garbage")
    with pytest.raises(BadInputError, match="could not be read"):
        Checkpoint.load(path)
