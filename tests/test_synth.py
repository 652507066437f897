"""The synthetic experiment: files, manifest, determinism, and the biology the models are meant to learn."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellmtl.errors import BadInputError
from cellmtl.synth import MANIFEST_COLUMNS, render_stack, write_experiment

N_STACKS, N_FRAMES, SIZE = 6, 12, 48


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _read(manifest: Path, row: dict[str, str]) -> np.ndarray:
    return tifffile.imread(manifest.parent / row["path"])


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_experiment(tmp_path_factory.mktemp("synth"), n_stacks=N_STACKS, n_frames=N_FRAMES, size=SIZE, seed=3)


def test_files_exist_and_read_back_as_tcyx(experiment: Path) -> None:
    assert experiment.name == "manifest.csv" and experiment.is_file()
    rows = _rows(experiment)
    assert len(rows) == N_STACKS
    for row in rows:
        path = experiment.parent / row["path"]
        assert path.is_file() and path.parent.name == "stacks" and path.name == f"{row['stack_id']}.tif"
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            assert series.axes == "TCYX"
            assert series.shape == (N_FRAMES, 2, SIZE, SIZE)
            assert series.dtype == np.uint16
            assert tf.imagej_metadata["finterval"] == pytest.approx(3600.0)
            arr = series.asarray()
        assert arr.max() > arr.min()  # not blank


def test_manifest_columns_and_values(experiment: Path) -> None:
    with experiment.open(newline="") as fh:
        assert tuple(next(csv.reader(fh))) == MANIFEST_COLUMNS
    rows = _rows(experiment)
    assert len({r["stack_id"] for r in rows}) == N_STACKS
    conditions = [r["condition"] for r in rows]
    assert conditions.count("infected") == conditions.count("uninfected") == N_STACKS // 2
    for r in rows:
        assert float(r["frame_interval_hours"]) == 1.0
        assert float(r["start_hour"]) >= 0.0
        if r["condition"] == "infected":
            onset = float(r["infection_onset_hour"])
            assert 1.0 <= onset <= 4.0 and (2 * onset).is_integer()
        else:
            assert r["condition"] == "uninfected" and r["infection_onset_hour"] == ""
    assert any(float(r["start_hour"]) > 0 for r in rows)
    groups: dict[str, set[str]] = {}
    for r in rows:
        groups.setdefault(r["group"], set()).add(r["condition"])
    assert len(groups) >= 2 and all(c == {"infected", "uninfected"} for c in groups.values())


def test_odd_stack_count_keeps_groups_stratifiable(tmp_path: Path) -> None:
    rows = _rows(write_experiment(tmp_path, n_stacks=3, n_frames=1, size=16))
    assert len(rows) == 3 and len({r["group"] for r in rows}) == 1


def test_frame_interval_is_written(tmp_path: Path) -> None:
    manifest = write_experiment(tmp_path, n_stacks=2, n_frames=2, size=16, frame_interval_hours=0.5)
    row = _rows(manifest)[0]
    assert float(row["frame_interval_hours"]) == 0.5
    with tifffile.TiffFile(manifest.parent / row["path"]) as tf:
        assert tf.imagej_metadata["finterval"] == pytest.approx(1800.0)


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    kw = {"n_stacks": 2, "n_frames": 3, "size": 32}
    a = write_experiment(tmp_path / "a", seed=5, **kw)
    b = write_experiment(tmp_path / "b", seed=5, **kw)
    c = write_experiment(tmp_path / "c", seed=6, **kw)
    assert a.read_text() == b.read_text()
    for ra, rb, rc in zip(_rows(a), _rows(b), _rows(c), strict=True):
        xa, xb, xc = _read(a, ra), _read(b, rb), _read(c, rc)
        assert xa.tobytes() == xb.tobytes()
        assert xa.shape == xc.shape and xa.tobytes() != xc.tobytes()


def _peak(arr: np.ndarray) -> np.ndarray:
    """Brightest cells over the background per frame and channel: 99th minus 10th percentile, [T, C] counts."""
    arr = arr.astype(np.float64)
    return np.percentile(arr, 99, axis=(-2, -1)) - np.percentile(arr, 10, axis=(-2, -1))


def test_reporter_marks_infected_stacks_and_rises_after_onset(experiment: Path) -> None:
    rows = _rows(experiment)
    late = {"infected": [], "uninfected": []}
    checked_rise = 0
    for r in rows:
        reporter = _peak(_read(experiment, r))[:, 1]
        late[r["condition"]].append(reporter[-3:].mean())
        if r["condition"] == "infected":
            tau = float(r["start_hour"]) + np.arange(N_FRAMES) - float(r["infection_onset_hour"])
            first = int(np.argmax(tau >= 0))
            if tau[first] <= 1.0:  # stacks that start late are already past the rise
                assert reporter[-3:].mean() > 3 * reporter[first] + 50, r["stack_id"]
                checked_rise += 1
    assert checked_rise >= 1
    assert min(late["infected"]) > 5 * max(late["uninfected"])


def _render(seed: int, onset: float | None, *, n_frames: int = 16, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng([seed, 0])
    return render_stack(rng, n_frames=n_frames, size=size, start_hour=0.0, frame_interval_hours=1.0, onset=onset)


def test_mock_wells_change_with_elapsed_time() -> None:
    """Uninfected cells carry a time course too: more nuclei (division) and dimmer stain (photobleaching)."""
    for seed in range(3):
        arr = _render(seed, None).astype(np.float64)
        nuclei = arr[:, 0]
        bg = np.percentile(nuclei, 10, axis=(1, 2), keepdims=True)
        peak = np.percentile(nuclei, 99.5, axis=(1, 2), keepdims=True) - bg
        area = (nuclei > bg + 0.25 * peak).mean(axis=(1, 2))
        assert area[-3:].mean() > 1.1 * area[:3].mean() or peak[-3:].mean() < 0.95 * peak[:3].mean(), seed
        assert _peak(arr)[:, 1].max() < 150  # no reporter without infection


def test_infection_is_invisible_at_onset_and_obvious_late() -> None:
    """Same generator, so the same cells with and without infection: nuclear stain identical-looking just after
    onset, brighter (rounded, condensed nuclei) 15+ h later."""

    for seed in range(2):
        infected, mock = _peak(_render(seed, 1.0, n_frames=20))[:, 0], _peak(_render(seed, None, n_frames=20))[:, 0]
        assert 0.85 < infected[1:3].mean() / mock[1:3].mean() < 1.15, seed
        assert infected[16:].mean() > 1.2 * mock[16:].mean(), seed


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"n_stacks": 1}, "n_stacks"),
        ({"n_frames": 0}, "n_frames"),
        ({"size": 8}, "size"),
        ({"size": 32.5}, "size"),
        ({"frame_interval_hours": 0.0}, "frame_interval_hours"),
        ({"frame_interval_hours": float("nan")}, "frame_interval_hours"),
    ],
)
def test_bad_arguments_are_bad_input(tmp_path: Path, kwargs: dict, word: str) -> None:
    with pytest.raises(BadInputError, match=word):
        write_experiment(tmp_path, **kwargs)
    assert not (tmp_path / "manifest.csv").exists()


def test_starter_config_points_few_wells_to_pretrained_weights(tmp_path):
    import yaml

    from cellmtl.cli import write_starter_config

    path = write_starter_config(tmp_path / "manifest.csv", tmp_path / "config.yaml")
    text = path.read_text()
    assert "Few wells" in text and "training.strategy=probe" in text and "model.weights=" in text
    assert yaml.safe_load(text)["experiment_name"] == "synthetic"  # the comments leave the YAML as it was
