"""Tests for cellmtl.data.readers: every reader is compared with a numpy oracle built from the written array."""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellmtl.data.readers import (
    SUPPORTED_IMAGE_SUFFIXES,
    StackInfo,
    StackReader,
    check_finite_stack,
    map_axes,
    natural_key,
    probe_stack,
    read_stack,
)
from cellmtl.errors import BadInputError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real data folder {REAL} absent")


def _rand(shape: tuple[int, ...], dtype: str = "uint16", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 30, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)


def _truncate(src: Path, dst: Path, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def _imagej_tcyx(tmp_path: Path, t: int = 5, c: int = 2) -> tuple[Path, np.ndarray]:
    arr = _rand((t, c, 16, 12))
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, arr, imagej=True, metadata={"axes": "TCYX"})
    return path, arr


def _bad(match: str | Path, fn, *args) -> BadInputError:
    """Assert fn(*args) raises BadInputError whose message contains `match` (usually the file path)."""
    with pytest.raises(BadInputError) as exc:
        fn(*args)
    assert str(match) in str(exc.value), str(exc.value)
    return exc.value


# --------------------------------------------------------------------------------------------- TIFF layouts


def test_imagej_hyperstack_tcyx_every_frame_and_channel_subset(tmp_path: Path) -> None:
    path, arr = _imagej_tcyx(tmp_path)
    info = probe_stack(path)
    assert info == StackInfo(str(path.resolve()), "imagej", 5, 2, 16, 12, "uint16", "TCYX", 1)
    reader = StackReader(info)
    for t in range(5):
        np.testing.assert_array_equal(reader.read(t), arr[t].astype(np.float32))
        for chans in ([0], [1], [1, 0]):
            out = reader.read(t, chans)
            assert out.dtype == np.float32 and out.shape == (len(chans), 16, 12)
            np.testing.assert_array_equal(out, arr[t, chans].astype(np.float32))
    assert reader._fd is not None and reader._tf is None  # contiguous, T first: one pread per frame, not read whole
    reader.close()


def test_frames_come_from_axes_not_page_count(tmp_path: Path) -> None:
    path, arr = _imagej_tcyx(tmp_path, t=10, c=2)
    with tifffile.TiffFile(path) as tf:
        assert len(tf.pages) == 20
    info = probe_stack(path)
    assert (info.n_frames, info.n_channels) == (10, 2)
    np.testing.assert_array_equal(read_stack(path), arr.astype(np.float32))


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_imagej_tzcyx_is_max_projected_over_z(tmp_path: Path, compression: str | None) -> None:
    arr = _rand((3, 4, 2, 8, 9))
    path = tmp_path / "tzcyx.tif"
    tifffile.imwrite(path, arr, imagej=True, metadata={"axes": "TZCYX"}, compression=compression)
    info = probe_stack(path)
    assert (info.n_frames, info.n_z, info.n_channels, info.axes) == (3, 4, 2, "TZCYX")
    reader = StackReader(info)
    for t in range(3):
        np.testing.assert_array_equal(reader.read(t), arr[t].max(axis=0).astype(np.float32))
        np.testing.assert_array_equal(reader.read(t, [1]), arr[t, :, [1]].max(axis=1).astype(np.float32))


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_ome_tiff_tcyx(tmp_path: Path, compression: str | None) -> None:
    arr = _rand((4, 3, 10, 7))
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(path, arr, ome=True, metadata={"axes": "TCYX"}, compression=compression)
    info = probe_stack(path)
    assert (info.format, info.n_frames, info.n_channels, info.height, info.width) == ("ome", 4, 3, 10, 7)
    np.testing.assert_array_equal(read_stack(path), arr.astype(np.float32))


@pytest.mark.parametrize(("metadata", "axes"), [({}, "QYX"), (None, "IYX")])
def test_plain_multipage_tiff_is_time(tmp_path: Path, metadata: dict | None, axes: str) -> None:
    arr = _rand((6, 8, 9))
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, arr, photometric="minisblack", metadata=metadata)
    info = probe_stack(path)
    assert (info.format, info.axes, info.n_frames, info.n_channels) == ("tiff", axes, 6, 1)
    np.testing.assert_array_equal(read_stack(path), arr[:, None].astype(np.float32))


def test_compressed_tiff_reads_only_the_pages_of_frame_t(tmp_path: Path) -> None:
    arr = _rand((5, 2, 8, 9))
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, arr, imagej=True, metadata={"axes": "TCYX"}, compression="zlib")
    reader = StackReader(probe_stack(path))
    np.testing.assert_array_equal(reader.read(0), arr[0].astype(np.float32))
    assert reader._mm is None and reader._tf is not None
    keys: list = []
    real_asarray = reader._tf.asarray

    def spy(*args, **kwargs):
        keys.append(kwargs.get("key"))
        return real_asarray(*args, **kwargs)

    reader._tf.asarray = spy  # type: ignore[method-assign]
    np.testing.assert_array_equal(reader.read(3), arr[3].astype(np.float32))
    assert keys == [[6, 7]]  # pages iterate T then C: frame 3 = pages 6, 7
    reader.close()


def test_big_endian_memmap(tmp_path: Path) -> None:
    arr = _rand((4, 8, 9))
    path = tmp_path / "be.tif"
    tifffile.imwrite(path, arr.astype(">u2"), byteorder=">", photometric="minisblack")
    np.testing.assert_array_equal(read_stack(path), arr[:, None].astype(np.float32))


def test_rgb_samples_count_as_channels(tmp_path: Path) -> None:
    arr = _rand((4, 8, 9, 3), "uint8")
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, arr, photometric="rgb")
    info = probe_stack(path)
    assert (info.n_frames, info.n_channels) == (4, 3)
    np.testing.assert_array_equal(read_stack(path), arr.transpose(0, 3, 1, 2).astype(np.float32))


def test_single_2d_tiff_and_png(tmp_path: Path) -> None:
    arr = _rand((8, 9), "uint8")
    tifffile.imwrite(tmp_path / "one.tif", arr)
    Image.fromarray(arr).save(tmp_path / "one.png")
    for name, fmt in (("one.tif", "tiff"), ("one.png", "image")):
        info = probe_stack(tmp_path / name)
        assert (info.format, info.axes, info.n_frames, info.n_channels, info.height, info.width) == (
            fmt,
            "YX",
            1,
            1,
            8,
            9,
        )
        np.testing.assert_array_equal(read_stack(tmp_path / name), arr[None, None].astype(np.float32))
    Image.fromarray(_rand((8, 9, 3), "uint8")).save(tmp_path / "one.jpg")
    info = probe_stack(tmp_path / "one.jpg")
    assert (info.format, info.axes, info.n_channels, info.dtype) == ("image", "YXS", 3, "uint8")
    assert read_stack(tmp_path / "one.jpg").shape == (1, 3, 8, 9)


def test_cyx_composite_is_one_frame_four_channels(tmp_path: Path) -> None:
    arr = _rand((4, 8, 9), "uint8")
    path = tmp_path / "composite.tif"
    tifffile.imwrite(path, arr, imagej=True, metadata={"axes": "CYX", "mode": "composite"})
    info = probe_stack(path)
    assert (info.format, info.axes, info.n_frames, info.n_channels) == ("imagej", "CYX", 1, 4)
    np.testing.assert_array_equal(StackReader(info).read(0, [3, 1]), arr[[3, 1]].astype(np.float32))


@pytest.mark.parametrize(
    "dtype", ["uint8", "uint16", "int8", "int16", "uint32", "int32", "float16", "float32", "float64"]
)
def test_accepted_dtypes_become_float32_unscaled(tmp_path: Path, dtype: str) -> None:
    arr = _rand((4, 8, 9), dtype)
    path = tmp_path / f"{dtype}.tif"
    tifffile.imwrite(path, arr, photometric="minisblack")
    info = probe_stack(path)
    assert info.dtype == dtype
    out = read_stack(path)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, arr[:, None].astype(np.float32))


@pytest.mark.parametrize("dtype", ["bool", "int64", "uint64", "complex64"])
def test_unsupported_dtypes(tmp_path: Path, dtype: str) -> None:
    path = tmp_path / f"{dtype}.tif"
    tifffile.imwrite(path, np.zeros((4, 8, 9), dtype), photometric="minisblack")
    err = _bad(path.name, probe_stack, path)
    assert f"unsupported dtype {dtype}" in str(err)


# --------------------------------------------------------------------------------------------- folders


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_folder_of_pngs_natural_sort(tmp_path: Path, dtype: str) -> None:
    frames = {name: _rand((8, 9), dtype, seed=i) for i, name in enumerate(["f10", "f2", "f1", "f3"])}
    for name, arr in frames.items():
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    info = probe_stack(tmp_path)
    assert (info.format, info.axes, info.n_frames, info.n_channels, info.dtype) == ("folder", "TYX", 4, 1, dtype)
    expected = np.stack([frames[n] for n in ["f1", "f2", "f3", "f10"]])[:, None].astype(np.float32)
    np.testing.assert_array_equal(read_stack(tmp_path), expected)


def test_natural_key_orders_digit_runs_numerically() -> None:
    names = ["frame_10.png", "frame_2.png", "Frame_1.png", "frame_2b.png"]
    assert sorted(names, key=natural_key) == ["Frame_1.png", "frame_2.png", "frame_2b.png", "frame_10.png"]


def test_folder_of_rgb_pngs_and_cyx_tiffs(tmp_path: Path) -> None:
    rgb = [_rand((8, 9, 3), "uint8", seed=i) for i in range(3)]
    (tmp_path / "rgb").mkdir()
    for i, arr in enumerate(rgb):
        Image.fromarray(arr).save(tmp_path / "rgb" / f"t{i}.png")
    assert probe_stack(tmp_path / "rgb").n_channels == 3
    np.testing.assert_array_equal(read_stack(tmp_path / "rgb"), np.stack(rgb).transpose(0, 3, 1, 2).astype(np.float32))
    cyx = [_rand((2, 8, 9), seed=i) for i in range(3)]
    (tmp_path / "cyx").mkdir()
    for i, arr in enumerate(cyx):
        tifffile.imwrite(tmp_path / "cyx" / f"t{i}.tif", arr, imagej=True, metadata={"axes": "CYX"})
    info = probe_stack(tmp_path / "cyx")
    assert (info.axes, info.n_frames, info.n_channels) == ("TCYX", 3, 2)
    np.testing.assert_array_equal(read_stack(tmp_path / "cyx"), np.stack(cyx).astype(np.float32))


@pytest.mark.parametrize("odd", ["shape", "dtype", "frames"])
def test_folder_odd_file_is_named(tmp_path: Path, odd: str) -> None:
    for i in range(3):
        tifffile.imwrite(tmp_path / f"t{i}.tif", np.zeros((8, 9), np.uint16))
    bad = {"shape": np.zeros((8, 10), np.uint16), "dtype": np.zeros((8, 9), np.uint8)}.get(odd)
    odd_file = tmp_path / "t3.tif"
    if bad is None:
        tifffile.imwrite(odd_file, np.zeros((5, 8, 9), np.uint16), photometric="minisblack")
    else:
        tifffile.imwrite(odd_file, bad)
    _bad(odd_file.name, probe_stack, tmp_path)


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    _bad(tmp_path, probe_stack, tmp_path)


def test_png_with_cut_off_end_chunk(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    Image.fromarray(_rand((32, 32), "uint8")).save(path)
    path.write_bytes(path.read_bytes()[:-10])  # Pillow decodes this without complaint; the CRC check does not
    _bad(path.name, probe_stack, path)


def test_truncated_png_in_folder_is_named(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(_rand((32, 32), "uint8", seed=i)).save(tmp_path / f"t{i}.png")
    _truncate(tmp_path / "t1.png", tmp_path / "t1.png", 0.7)
    _bad("t1.png", probe_stack, tmp_path)


# --------------------------------------------------------------------------------------------- bad input


def test_missing_paths(tmp_path: Path) -> None:
    _bad("nope.tif", probe_stack, tmp_path / "nope.tif")
    _bad("nodir", probe_stack, tmp_path / "nodir")


@pytest.mark.parametrize("content", [b"", b"this is not a tiff at all" * 10, b"II*\x00" + b"\xff" * 40])
def test_garbage_tiff(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.tif"
    path.write_bytes(content)
    _bad(path.name, probe_stack, path)


def test_png_renamed_tif_and_unsupported_suffix(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(tmp_path / "a.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "a.tif")
    _bad("a.tif", probe_stack, tmp_path / "a.tif")
    (tmp_path / "a.bmp").write_bytes(b"BM")
    _bad("a.bmp", probe_stack, tmp_path / "a.bmp")
    assert {".tif", ".tiff", ".png"} <= set(SUPPORTED_IMAGE_SUFFIXES)


@pytest.mark.parametrize("keep", [0.7, 0.9, 0.99])
def test_truncated_imagej_hyperstack(tmp_path: Path, keep: float) -> None:
    path, _ = _imagej_tcyx(tmp_path, t=10)
    cut = _truncate(path, tmp_path / "cut.tif", keep)
    _bad(cut.name, probe_stack, cut)


@pytest.mark.parametrize("extra", [30, 10, 2])
def test_cut_inside_last_ifd(tmp_path: Path, extra: int) -> None:
    """Pixels intact but the last IFD is cut: tifffile may read it silently (even invent a page)."""
    path, _ = _imagej_tcyx(tmp_path)
    with tifffile.TiffFile(path) as tf:
        last_ifd = tf.pages.get(len(tf.pages) - 1).offset
    cut = tmp_path / "cut.tif"
    cut.write_bytes(path.read_bytes()[: last_ifd + extra])
    _bad(cut.name, probe_stack, cut)


@pytest.mark.parametrize("keep", [0.5, 0.7, 0.95])
@pytest.mark.parametrize("kind", ["plain", "ome"])
def test_truncated_zlib_multipage(tmp_path: Path, keep: float, kind: str) -> None:
    path = tmp_path / "z.tif"
    arr = _rand((8, 16, 16))
    if kind == "ome":
        tifffile.imwrite(path, arr, ome=True, metadata={"axes": "TYX"}, compression="zlib")
    else:
        tifffile.imwrite(path, arr, photometric="minisblack", compression="zlib")
    cut = _truncate(path, tmp_path / "cut.tif", keep)
    _bad(cut.name, probe_stack, cut)


@pytest.mark.parametrize(("kind", "keep"), [("plain", 0.5), ("ome", 0.9), ("ome", 0.99)])
def test_truncation_caught_when_tifffile_logger_is_silenced(tmp_path: Path, kind: str, keep: float) -> None:
    """These cuts only show up in tifffile's log (the OME-XML sits at the end of the file), so the log must be
    listened to even when the application raised tifffile's log level."""
    path = tmp_path / "z.tif"
    arr = _rand((8, 16, 16))
    if kind == "ome":
        tifffile.imwrite(path, arr, ome=True, metadata={"axes": "TYX"}, compression="zlib")
    else:
        tifffile.imwrite(path, arr, photometric="minisblack", compression="zlib")
    cut = _truncate(path, tmp_path / "cut.tif", keep)
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        _bad(cut.name, probe_stack, cut)
    finally:
        log.setLevel(level)
    assert log.level == level and log.propagate


def test_empty_stack(tmp_path: Path) -> None:
    path = tmp_path / "empty.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(path, np.zeros((0, 8, 9), np.uint16))
    _bad(path.name, probe_stack, path)


def test_map_axes_rules() -> None:
    assert map_axes("IYX", (3, 8, 9), "f") == "TYX"
    assert map_axes("QYXS", (3, 8, 9, 3), "f") == "TYXC"
    assert map_axes("TZCYX", (2, 3, 4, 8, 9), "f") == "TZCYX"
    assert map_axes("TAYX", (2, 1, 8, 9), "f") == "T1YX"  # unknown singleton is dropped
    for axes in ("IQYX", "TIYX"):
        with pytest.raises(BadInputError, match="the_file.tif"):
            map_axes(axes, (2, 3, 8, 9), "the_file.tif")
    with pytest.raises(BadInputError, match="Y and X"):
        map_axes("QZX", (2, 3, 9), "f")


def test_nan_and_inf_frames(tmp_path: Path) -> None:
    arr = _rand((4, 2, 8, 9), "float32")
    arr[2, 1, 3, 3] = np.nan
    arr[3, 0, 0, 0] = np.inf
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, arr, imagej=True, metadata={"axes": "TCYX"})
    info = probe_stack(path)
    reader = StackReader(info)
    np.testing.assert_array_equal(reader.read(1), arr[1])
    for t in (2, 3):
        err = _bad(path.name, reader.read, t)
        assert f"NaN/Inf pixels in frame {t}" in str(err)
    _bad("frame 2", check_finite_stack, info)
    clean = tmp_path / "clean.tif"
    tifffile.imwrite(clean, np.nan_to_num(arr, posinf=0.0), imagej=True, metadata={"axes": "TCYX"})
    check_finite_stack(probe_stack(clean))


def test_float64_overflow_is_inf(tmp_path: Path) -> None:
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, np.full((2, 8, 9), 1e300), photometric="minisblack")
    _bad("NaN/Inf pixels in frame 0", StackReader(probe_stack(path)).read, 0)


def test_frame_and_channel_out_of_range(tmp_path: Path) -> None:
    path, _ = _imagej_tcyx(tmp_path)
    reader = StackReader(probe_stack(path))
    _bad("frame 5", reader.read, 5)
    _bad("channels", reader.read, 0, [2])
    _bad("channels", reader.read, 0, [-1])


# --------------------------------------------------------------------------------------------- pickling


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_reader_pickles_after_read(tmp_path: Path, compression: str | None) -> None:
    arr = _rand((5, 2, 8, 9))
    path = tmp_path / "p.tif"
    tifffile.imwrite(path, arr, imagej=True, metadata={"axes": "TCYX"}, compression=compression)
    reader = StackReader(probe_stack(path))
    first = reader.read(2)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._mm is None and clone._fd is None and clone._tf is None and clone.info == reader.info
    for t in range(5):
        np.testing.assert_array_equal(clone.read(t), reader.read(t))
    np.testing.assert_array_equal(clone.read(2), first)
    reader.close()
    clone.close()


_FORKED: StackReader | None = None


def _read_in_child(t: int) -> np.ndarray:
    assert _FORKED is not None
    return _FORKED.read(t)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_reader_opened_in_parent_works_in_forked_workers(tmp_path: Path) -> None:
    global _FORKED
    arr = _rand((6, 2, 8, 9))
    path = tmp_path / "f.tif"
    tifffile.imwrite(path, arr, imagej=True, metadata={"axes": "TCYX"}, compression="zlib")
    _FORKED = StackReader(probe_stack(path))
    try:
        _FORKED.read(0)  # parent holds an open TiffFile; children must not share its file position
        with multiprocessing.get_context("fork").Pool(2) as pool:
            outs = pool.map(_read_in_child, range(6))
    finally:
        _FORKED.close()
        _FORKED = None
    np.testing.assert_array_equal(np.stack(outs), arr.astype(np.float32))


# --------------------------------------------------------------------------------------------- real data


@needs_real
def test_real_gowt1_timelapse() -> None:
    path = REAL / "ctc_gowt1_timelapse" / "gowt1_crop_T30.tif"
    info = probe_stack(path)
    assert (info.n_frames, info.n_channels, info.height, info.width, info.dtype) == (30, 1, 511, 511, "uint8")
    oracle = tifffile.imread(path)
    reader = StackReader(info)
    for t in (0, 17, 29):
        np.testing.assert_array_equal(reader.read(t), oracle[t][None].astype(np.float32))


@needs_real
def test_real_gowt1_truncated(tmp_path: Path) -> None:
    cut = _truncate(REAL / "ctc_gowt1_timelapse" / "gowt1_crop_T30.tif", tmp_path / "gowt1_cut.tif", 0.7)
    _bad(cut.name, probe_stack, cut)


@needs_real
@pytest.mark.parametrize("cut_bytes", [4, 52])
def test_real_composite_tail_cut(tmp_path: Path, cut_bytes: int) -> None:
    data = (REAL / "hsv1_mef_fixed_timepoints" / "confocal_pla" / "NI_pos49_MAX10.tif").read_bytes()
    cut = tmp_path / "NI_cut.tif"
    cut.write_bytes(data[:-cut_bytes])
    _bad(cut.name, probe_stack, cut)


@needs_real
def test_real_confocal_cyx_composite() -> None:
    path = REAL / "hsv1_mef_fixed_timepoints" / "confocal_pla" / "NI_pos49_MAX10.tif"
    info = probe_stack(path)
    assert (info.format, info.axes, info.n_frames, info.n_channels) == ("imagej", "CYX", 1, 4)
    np.testing.assert_array_equal(read_stack(path)[0], tifffile.imread(path).astype(np.float32))


@needs_real
def test_real_sxt_float32_slice() -> None:
    path = REAL / "hsv1_mef_fixed_timepoints" / "sxt_berkeley" / "NI_slice479.tif"
    info = probe_stack(path)
    assert (info.axes, info.dtype, info.n_frames, info.n_channels) == ("YX", "float32", 1, 1)
    np.testing.assert_array_equal(read_stack(path)[0, 0], tifffile.imread(path))


@needs_real
def test_every_real_tiff_probes() -> None:
    for path in sorted(REAL.rglob("*.tif")):
        info = probe_stack(path)
        assert info.n_frames >= 1 and info.height > 1 and info.width > 1, path
