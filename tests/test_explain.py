"""Grad-CAM: shape and range, it finds an object pasted into an empty image, default frame picks, the CLI."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cellmtl.cli import main
from cellmtl.explain import grad_cam, pick_frames
from cellmtl.models import ModelSpec, MultiTaskNet


def fixed_model(name: str, in_chans: int = 1) -> MultiTaskNet:
    """Untrained, fixed-seed trunk; heads that sum the pooled features, so every feature map counts with a
    positive weight and the map shows where the trunk responds."""
    torch.manual_seed(0)
    m = MultiTaskNet(ModelSpec(name, in_chans, "multitask", head_hidden=8, dropout=0.0)).eval()
    with torch.no_grad():
        for head in (m.cls_head, m.time_head):
            head[0].weight.fill_(1.0 / head[0].in_features)
            head[0].bias.zero_()
            head[3].weight.fill_(1.0)
            head[3].bias.zero_()
    return m


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])  # basic and bottleneck blocks
def test_grad_cam_shape_and_range(name):
    torch.manual_seed(1)
    m = MultiTaskNet(ModelSpec(name, 2, "multitask", head_hidden=8)).eval()
    x = torch.randn(3, 2, 64, 64)
    for head, sign in (("infected", torch.tensor([1.0, -1.0, 1.0])), ("time", None)):
        cam = grad_cam(m, x, head, sign)
        assert cam.shape == (3, 64, 64) and cam.dtype == torch.float32
        assert torch.isfinite(cam).all() and cam.min() >= 0.0 and cam.max() <= 1.0
    assert all(p.grad is None for p in m.parameters())  # no gradients left behind
    assert float(grad_cam(fixed_model(name, 2), torch.zeros(1, 2, 64, 64), "time").abs().max()) == 0.0


@pytest.mark.parametrize("head", ["infected", "time"])
def test_grad_cam_finds_a_pasted_square(head):
    m, size, side = fixed_model("resnet18"), 128, 32
    area = side * side / size**2
    for r, c in ((0, 0), (96, 0), (0, 96), (96, 96), (48, 48)):
        x = torch.zeros(1, 1, size, size)
        x[..., r : r + side, c : c + side] = 3.0
        cam = grad_cam(m, x, head)[0]
        inside = float(cam[r : r + side, c : c + side].sum() / cam.sum())
        mirror = float(cam[c : c + side, r : r + side].sum() / cam.sum())  # transposed position
        assert inside > area, (r, c, inside)
        assert (r, c) in ((0, 0), (96, 96), (48, 48)) or inside > mirror


def test_pick_frames_by_hand():
    prob = np.array([0.9, 0.55, 0.1, 0.3])
    labels = np.array([1, 1, 1, 1])
    assert pick_frames(prob, labels, None) == {0: ["most confident"], 1: ["least confident"], 2: ["most wrong"]}
    assert pick_frames(prob, np.full(4, -1), None) == {0: ["most confident"], 1: ["least confident"]}
    err = np.array([0.1, 5.0, np.nan])
    assert pick_frames(None, np.full(3, -1), err) == {0: ["first"], 1: ["middle", "largest time error"], 2: ["last"]}


@pytest.mark.slow
def test_explain_cli_writes_montages_and_index(tmp_path, tiny_config, tiny_experiment, capsys, monkeypatch):
    monkeypatch.setattr("cellmtl.training.loop.write_run_plots", lambda *a, **k: [])  # plots are tested elsewhere
    assert main(["train", "--config", str(tiny_config), "--set", "training.epochs=1"]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    ckpt = str(run / "checkpoints" / "best.pt")
    out = tmp_path / "explain"
    three = tiny_experiment.with_name("three.csv")  # 3 stacks keep the test short
    three.write_text("".join(tiny_experiment.read_text().splitlines(keepends=True)[:4]))
    assert main(["explain", "--checkpoint", ckpt, "--manifest", str(three), "--out", str(out)]) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == out / "index.html"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert [p for p in pngs if p.startswith("s")] == ["s0.png", "s1.png", "s2.png"] and "plate.png" in pngs  # wells
    page = (out / "index.html").read_text()
    assert all(f"src='{p}'" in page for p in pngs) and "most wrong" in page and "Plate view" in page
    stack = str(tiny_experiment.parent / "stacks" / "s1.tif")
    assert main(["explain", "--checkpoint", ckpt, stack, "--out", str(tmp_path / "one"), "--frames", "0", "5"]) == 0
    assert (tmp_path / "one" / "s1.png").is_file() and "chosen" in (tmp_path / "one" / "index.html").read_text()
    capsys.readouterr()
    assert main(["explain", "--checkpoint", ckpt, stack, "--out", str(tmp_path / "x"), "--frames", "99"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: explain --frames: frame 99")
