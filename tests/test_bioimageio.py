"""`cellmtl export --format bioimageio`: the package passes bioimage.io's own test, offline, and its outputs
equal `cellmtl predict` on the same image."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cellmtl.checkpoints import Checkpoint
from cellmtl.cli import main
from cellmtl.config import load_config
from cellmtl.data.transforms import Normalizer
from cellmtl.models import ModelSpec, build_model

pytest.importorskip("bioimageio.core")
pytest.importorskip("onnxruntime")


def tiny_checkpoint(tmp_path: Path, config: Path) -> Path:
    """An untrained resnet18 at 32 px in checkpoint form: the package must reproduce any weights, and building
    it directly saves the training time."""
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="resnet18", in_chans=2, mode="multitask", head_hidden=16)).eval()
    model.set_time_scaling(6.0, 3.0)
    ckpt = Checkpoint(model=model.state_dict(), model_spec=model.spec, config=load_config(config),
                      normalizer=Normalizer("per_image", (1.0, 99.8)), channels=(0, 1), channel_names=None,
                      channel_luts=None, splits={}, epoch=0, run_id="untrained")
    return ckpt.save(tmp_path / "tiny.pt")


def test_bioimageio_package_passes_test_model_and_matches_predict(tiny_config, tmp_path, capsys, caplog):
    from bioimageio.core import test_model

    ckpt = tiny_checkpoint(tmp_path, tiny_config)
    pkg = tmp_path / "pkg"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "bioimageio", "--out", str(pkg)]) == 0
    assert "bioimageio.core test_model: passed" in caplog.text  # export tested what it wrote
    assert {"rdf.yaml", "weights.onnx", "test_input.npy", "test_output.npy", "cover.png", "README.md"} <= {
        p.name for p in pkg.iterdir()
    }
    rdf = (pkg / "rdf.yaml").read_text()
    assert "format_version: 0.5" in rdf and "prob_infected" in rdf and "channel1" in rdf
    assert "## Validation" in (pkg / "README.md").read_text()

    summary = test_model(pkg / "rdf.yaml")  # offline: every file is local
    assert summary.status == "passed", summary.format()

    # The expected output is cellmtl's own PyTorch path; check it against `cellmtl predict` on the test image.
    image = np.load(pkg / "test_input.npy")
    assert image.dtype == np.uint16 and image.shape == (1, 2, 32, 32)
    tifffile.imwrite(tmp_path / "one.tif", image, imagej=True, metadata={"axes": "TCYX"})
    out = tmp_path / "pred.csv"
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "one.tif"), "--out", str(out)]) == 0
    row = next(csv.DictReader(out.open()))
    expected = np.load(pkg / "test_output.npy")
    np.testing.assert_allclose([float(row["prob_infected"]), float(row["pred_time_hours"])], expected[0], atol=1e-3)

    zipped = tmp_path / "model.zip"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "bioimageio", "--out", str(zipped)]) == 0
    assert {"rdf.yaml", "weights.onnx", "test_input.npy"} <= set(zipfile.ZipFile(zipped).namelist())


def test_dataset_normaliser_becomes_scale_linear():
    """`dataset` mode is declared as per-channel scale_linear; applied by hand it equals the Normalizer."""
    from cellmtl.export.bioimageio import preprocessing

    norm = Normalizer("dataset", (1.0, 99.0), lo=(100.0, 120.0), hi=(900.0, 5000.0))
    steps = preprocessing(norm)
    assert [s.id for s in steps] == ["ensure_dtype", "scale_linear", "ensure_dtype"]
    assert steps[0].kwargs.dtype == "float32"
    gain, offset = np.array(steps[1].kwargs.gain), np.array(steps[1].kwargs.offset)
    x = torch.rand(2, 4, 4) * 6000
    by_steps = x.numpy() * gain[:, None, None] + offset[:, None, None]
    np.testing.assert_allclose(by_steps, norm(x.clone()).numpy(), rtol=1e-5, atol=1e-5)


def test_range_floor_checkpoint_is_refused_for_bioimageio(tiny_config, tmp_path, capsys):
    """bioimageio.core 0.11 ignores scale_range's eps, so a floored normaliser cannot be declared faithfully."""
    ckpt_path = tiny_checkpoint(tmp_path, tiny_config)
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["normalizer"] = Normalizer("per_image", (1.0, 99.8), floor=(300.0, 80.0)).to_dict()
    torch.save(ckpt, ckpt_path)
    code = main(["export", "--checkpoint", str(ckpt_path), "--format", "bioimageio", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "range_floor" in err
    assert not (tmp_path / "p").exists()


def test_bad_out_paths_are_bad_input(tiny_config, tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path, tiny_config)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    code = main(["export", "--checkpoint", str(ckpt), "--format", "bioimageio", "--out", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "holds no bioimage.io package" in err
    assert (tmp_path / "data" / "keep.txt").read_text() == "mine"


def test_export_fails_loudly_when_its_package_does_not_reproduce_cellmtl(
    tiny_config, tmp_path, capsys, caplog, monkeypatch
):
    """A package whose test output disagrees with what its weights compute must not be reported as exported:
    exit 1, one error line naming the failed test_model check, and the package left for inspection."""
    from cellmtl.export import bioimageio

    true_output = bioimageio.reference_output
    monkeypatch.setattr(bioimageio, "reference_output", lambda *a: true_output(*a) + 0.5)
    ckpt = tiny_checkpoint(tmp_path, tiny_config)
    code = main(["export", "--checkpoint", str(ckpt), "--format", "bioimageio", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and len(lines) == 1, err
    assert "failed bioimageio.core test_model" in lines[0] and "reproduce" in lines[0].lower(), lines[0]
    assert "test_model: passed" not in caplog.text
    assert (tmp_path / "p" / "rdf.yaml").is_file()
