"""Reading a mixed experiment (ImageJ hyperstack, OME-TIFF, folder of frames) into samples, frame by frame."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cellmtl.config import AugmentConfig, config_from_dict
from cellmtl.data.dataset import EpochSampler, TimeCourseDataset, build_normalizer, load_experiment
from cellmtl.data.transforms import Normalizer, augment, channel_percentiles, fit_normalizer
from cellmtl.errors import BadInputError


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    arrays = {
        "hyper": rng.integers(0, 4000, size=(5, 2, 20, 24)).astype(np.uint16),
        "ome": rng.integers(0, 4000, size=(4, 2, 20, 24)).astype(np.uint16),
        "folder": rng.integers(0, 4000, size=(3, 2, 20, 24)).astype(np.uint16),
        "mock": rng.integers(0, 4000, size=(6, 2, 20, 24)).astype(np.uint16),
    }
    tifffile.imwrite(tmp_path / "hyper.tif", arrays["hyper"], imagej=True, metadata={"axes": "TCYX"})
    tifffile.imwrite(tmp_path / "ome.ome.tif", arrays["ome"], ome=True, metadata={"axes": "TCYX"})
    tifffile.imwrite(tmp_path / "mock.tif", arrays["mock"], imagej=True, metadata={"axes": "TCYX"})
    (tmp_path / "frames").mkdir()
    for t in range(3):
        tifffile.imwrite(tmp_path / "frames" / f"f{t}.tif", arrays["folder"][t], metadata={"axes": "CYX"})
    (tmp_path / "m.csv").write_text(
        "stack_id,path,condition,infection_onset_hour,frame_interval_hours,start_hour,split\n"
        "hyper,hyper.tif,infected,1.5,0.5,0,train\n"
        "ome,ome.ome.tif,infected,6,1,4,val\n"
        "folder,frames,uninfected,,2,10,val\n"
        "mock,mock.tif,uninfected,,1,0,train\n"
    )
    return tmp_path / "m.csv", arrays


def cfg_for(manifest: Path, **data):
    return config_from_dict({"data": {"manifest": str(manifest), "num_workers": 0, **data}, "seed": 0})


def test_mixed_formats_shapes_and_targets(mixed):
    manifest, arrays = mixed
    cfg = cfg_for(manifest)
    exp = load_experiment(cfg)
    shapes = {
        r.stack_id: (i.n_frames, i.n_channels, i.height, i.width) for r, i in zip(exp.records, exp.infos, strict=False)
    }
    assert shapes == {"hyper": (5, 2, 20, 24), "ome": (4, 2, 20, 24), "folder": (3, 2, 20, 24), "mock": (6, 2, 20, 24)}
    train = exp.index("train", cfg.data.frames.train, "drop")
    val = exp.index("val", cfg.data.frames.val, "drop")
    ids = [r.stack_id for r in exp.records]
    got = {
        (ids[s], int(f)): (float(h), int(y), float(t))
        for s, f, h, y, t in zip(train.stack, train.frame, train.hours, train.infected, train.time_target, strict=False)
    }
    got.update(
        {
            (ids[s], int(f)): (float(h), int(y), float(t))
            for s, f, h, y, t in zip(val.stack, val.frame, val.hours, val.infected, val.time_target, strict=False)
        }
    )
    expected = {}
    for f in range(5):  # interval 0.5 h, onset 1.5 h: frames 0-2 are before onset and dropped
        if f * 0.5 >= 1.5:
            expected[("hyper", f)] = (f * 0.5, 1, f * 0.5 - 1.5)
    for f in range(4):  # start 4 h, onset 6 h
        if 4 + f >= 6:
            expected[("ome", f)] = (4.0 + f, 1, 4.0 + f - 6)
    for f in range(3):  # start 10 h, 2 h interval, uninfected: time = hours since start
        expected[("folder", f)] = (10.0 + 2 * f, 0, 10.0 + 2 * f)
    for f in range(6):
        expected[("mock", f)] = (float(f), 0, float(f))
    assert got == expected


def test_dataset_items_match_raw_pixels(mixed):
    manifest, arrays = mixed
    cfg = cfg_for(manifest, image_size=24, channels=[1])
    exp = load_experiment(cfg)
    index = exp.index("val", cfg.data.frames.val, "drop")
    norm = Normalizer("dataset", (0.0, 100.0), (0.0,), (1.0,))  # identity
    ds = TimeCourseDataset(
        exp.infos, [r.stack_id for r in exp.records], index, channels=[1], image_size=20, normalizer=norm
    )
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 20, 20)
        raw = arrays[item["stack_id"]][item["frame"], 1].astype(np.float32)
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(raw)[None, None], size=(20, 20), mode="bilinear", antialias=True, align_corners=False
        )[0]
        torch.testing.assert_close(item["image"], expected)
        assert item["has_time"] and float(item["time_h"]) == float(index.time_target[i])


def test_channel_mismatch_is_bad_input(tmp_path, mixed):
    manifest, _ = mixed
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((3, 20, 24), np.uint16), imagej=True, metadata={"axes": "TYX"})
    with manifest.open("a") as fh:
        fh.write("one,one.tif,uninfected,,1,0,train\n")
    with pytest.raises(BadInputError, match="stack_id one .* 1 channel"):
        load_experiment(cfg_for(manifest))
    with pytest.raises(BadInputError, match="asks for channel 1"):
        load_experiment(cfg_for(manifest, channels=[1]))


def test_dataset_normaliser_uses_training_frames(mixed):
    manifest, arrays = mixed
    cfg = cfg_for(manifest, normalization={"mode": "dataset", "percentiles": [0.0, 100.0]})
    exp = load_experiment(cfg)
    norm = build_normalizer(cfg, exp, exp.index("train", cfg.data.frames.train, "drop"))
    train_pixels = np.concatenate([arrays["hyper"][3:], arrays["mock"]], axis=0)  # frames kept in train
    assert norm.lo[0] >= train_pixels[:, 0].min() and norm.hi[0] <= train_pixels[:, 0].max()
    assert norm.hi[0] > 3500 and norm.lo[0] < 500


def test_range_floor_is_measured_on_training_frames(mixed):
    manifest, arrays = mixed
    cfg = cfg_for(manifest, normalization={"range_floor": 0.1})
    exp = load_experiment(cfg)
    norm = build_normalizer(cfg, exp, exp.index("train", cfg.data.frames.train, "drop"))
    assert norm.mode == "per_image" and norm.floor is not None and len(norm.floor) == len(exp.channels)
    widest = max(float(a[:, c].max() - a[:, c].min()) for a in arrays.values() for c in range(a.shape[1]))
    assert all(0 < f <= 0.1 * widest for f in norm.floor)
    assert build_normalizer(cfg_for(manifest), exp, exp.index("train", cfg.data.frames.train, "drop")).floor is None


def test_per_image_normalisation_maps_percentiles_to_unit_range():
    img = torch.arange(2 * 10 * 10, dtype=torch.float32).reshape(2, 10, 10)
    out = fit_normalizer("per_image", (0.0, 100.0))(img)
    assert torch.isclose(out.amin(dim=(1, 2)), torch.zeros(2)).all()
    assert torch.isclose(out.amax(dim=(1, 2)), torch.ones(2)).all()
    lo, hi = channel_percentiles(img.numpy(), 1, 99)
    np.testing.assert_allclose(lo, np.percentile(img.numpy().reshape(2, -1), 1, axis=1), rtol=1e-6)


def test_normalizer_round_trip():
    n = Normalizer("dataset", (1.0, 99.8), (1.0, 2.0), (3.0, 4.0))
    assert Normalizer.from_dict(n.to_dict()) == n
    f = Normalizer("per_image", (1.0, 99.8), floor=(10.0, 20.0))
    assert Normalizer.from_dict(f.to_dict()) == f
    old = {"mode": "per_image", "percentiles": [1.0, 99.8], "lo": None, "hi": None}  # a checkpoint before floors
    assert Normalizer.from_dict(old).floor is None


def test_range_floor_keeps_a_dark_channel_dark():
    """Floor = fraction x the 90th percentile of per-frame ranges; (x - lo) / (hi - lo + floor) by hand."""
    rng = np.random.default_rng(0)
    bright = [np.stack([rng.uniform(0, 1000, 5000), rng.uniform(0, 2000, 5000)]).astype(np.float32) for _ in range(9)]
    dark = [np.stack([rng.uniform(0, 1000, 5000), rng.uniform(0, 10, 5000)]).astype(np.float32)]
    norm = fit_normalizer("per_image", (0.0, 100.0), bright + dark, floor_fraction=0.1)
    spans = np.array([[s[c].max() - s[c].min() for c in range(2)] for s in bright + dark])
    np.testing.assert_allclose(norm.floor, 0.1 * np.percentile(spans, 90, axis=0), rtol=1e-5)
    img = torch.stack([torch.linspace(0, 1000, 100), torch.linspace(0, 10, 100)]).reshape(2, 10, 10)
    out = norm(img)
    expected = (img.numpy() - 0) / (np.array([1000.0, 10.0]) + np.array(norm.floor))[:, None, None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert out[1].max() < 0.06  # a camera-noise channel stays near 0 (plain per_image would stretch it to 1)
    assert out[0].max() > 0.9  # a bright channel keeps nearly its full range
    assert fit_normalizer("per_image", (0.0, 100.0), bright, floor_fraction=0.0).floor is None


def test_augment_is_reproducible_from_its_generator():
    img = torch.rand(2, 16, 16)
    cfg = AugmentConfig(noise_std=0.1)
    a = augment(img, cfg, torch.Generator().manual_seed(5))
    b = augment(img, cfg, torch.Generator().manual_seed(5))
    c = augment(img, cfg, torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert augment(img, AugmentConfig(enabled=False), torch.Generator()) is img


def test_augmentation_per_epoch_and_sampler(mixed):
    manifest, _ = mixed
    cfg = cfg_for(manifest, image_size=16)
    exp = load_experiment(cfg)
    index = exp.index("train", cfg.data.frames.train, "drop")
    norm = Normalizer("dataset", (0.0, 100.0), (0.0, 0.0), (4000.0, 4000.0))
    ds = TimeCourseDataset(
        exp.infos,
        [r.stack_id for r in exp.records],
        index,
        channels=[0, 1],
        image_size=16,
        normalizer=norm,
        augment_cfg=cfg.data.augment,
        seed=1,
    )
    torch.testing.assert_close(ds[(0, 1)]["image"], ds[(0, 1)]["image"])
    assert not torch.allclose(ds[(0, 1)]["image"], ds[(0, 2)]["image"])
    s = EpochSampler(len(ds), shuffle=True, seed=0)
    first = list(s)
    s.set_epoch(1)
    assert sorted(i for i, _ in first) == list(range(len(ds))) and list(s) != first


def test_random_crop_keeps_shape_and_is_seeded():
    img = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 16, 16)
    cfg = AugmentConfig(flips=False, rot90=False, intensity_scale=0.0, intensity_offset=0.0, crop_scale=0.5)
    a = augment(img, cfg, torch.Generator().manual_seed(1))
    assert a.shape == img.shape and not torch.allclose(a, img)
    torch.testing.assert_close(a, augment(img, cfg, torch.Generator().manual_seed(1)))
    off = AugmentConfig(flips=False, rot90=False, intensity_scale=0.0, intensity_offset=0.0)
    torch.testing.assert_close(augment(img, off, torch.Generator().manual_seed(1)), img)


def test_memory_cache_gives_the_same_samples(tiny_config):
    """data.cache: memory decodes each frame once; samples (augmented ones too) are unchanged."""
    from cellmtl.config import load_config
    from cellmtl.data.dataset import build_normalizer, load_experiment
    from cellmtl.training.state import datasets, split_indices

    cfg = load_config(tiny_config)
    exp = load_experiment(cfg)
    indices = split_indices(cfg, exp)
    train = datasets(cfg, exp, indices, build_normalizer(cfg, exp, indices["train"]))[0]
    before = [train[(i, 3)]["image"] for i in range(len(train))]
    train.fill_cache()
    assert train.cache is not None and train.cache.shape == (len(train), 2, 32, 32)
    train.readers = []  # no file access any more
    for i in range(len(train)):
        assert torch.equal(train[(i, 3)]["image"], before[i])
    assert torch.equal(train.cache[0], train.load_image(0))  # augmentation never wrote into the cache
