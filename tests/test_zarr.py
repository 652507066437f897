"""OME-Zarr (NGFF 0.4 and 0.5) images and HCS plates, written here with the zarr library."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from cellmtl.cli import main
from cellmtl.data.filemeta import ngff_image
from cellmtl.data.readers import StackReader, probe_stack, read_stack
from cellmtl.errors import BadInputError
from tests.conftest import tiny_stack, write_config

zarr = pytest.importorskip("zarr", minversion="3")

AXES = [{"name": "t", "type": "time", "unit": "hour"}, {"name": "c", "type": "channel"},
        {"name": "z", "type": "space", "unit": "micrometer"}, {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"}]


def write_ngff(path: Path, data: np.ndarray, *, version: str = "0.4", t_step: float = 0.5, t_unit: str = "hour",
               labels=("DAPI", "GFP")) -> Path:
    """A TCZYX OME-Zarr image with one resolution level, chunked per frame, channel and 16 x 16 tile."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    arr = group.create_array("0", shape=data.shape, chunks=(1, 1, 1, 16, 16), dtype=data.dtype)
    arr[:] = data
    axes = [dict(a, unit=t_unit) if a["name"] == "t" else a for a in AXES]
    ms = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [t_step, 1.0, 1.0, 0.5, 0.5]}]}]}
    omero = {"channels": [{"label": lab} for lab in labels]}
    if version == "0.4":
        group.attrs["multiscales"] = [dict(ms, version="0.4")]
        group.attrs["omero"] = omero
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [ms], "omero": omero}
    return path


def _data(frames: int = 8, infected: bool = False, seed: int = 0) -> np.ndarray:
    return tiny_stack(np.random.default_rng(seed), frames, size=32, infected=infected)[:, :, None]  # T C Z Y X


def test_ngff_metadata_by_hand():
    ms = {"axes": AXES, "datasets": [{"path": "s0", "coordinateTransformations": [
        {"type": "scale", "scale": [2.0, 1, 1, 1, 1]}]}], "coordinateTransformations": [
        {"type": "scale", "scale": [0.25, 1, 1, 1, 1]}]}
    img = ngff_image({"multiscales": [ms]})
    assert (img.axes, img.path, img.times.interval_hours) == ("TCZYX", "s0", 0.5)  # both scales multiply
    minutes = ngff_image({"ome": {"version": "0.5", "multiscales": [dict(ms, axes=[dict(AXES[0], unit="minute"),
                                                                                  *AXES[1:]])]}})
    assert minutes.version == "0.5" and minutes.times.interval_hours == pytest.approx(0.5 / 60)
    assert ngff_image({"plate": {}}) is None


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ngff_images_read_frame_by_frame(tmp_path, version):
    data = _data()
    path = write_ngff(tmp_path / "img.ome.zarr", data, version=version)
    info = probe_stack(path)
    assert (info.format, info.n_frames, info.n_channels, info.n_z, info.height) == ("zarr", 8, 2, 1, 32)
    assert info.channel_names == ("DAPI", "GFP") and info.file_times.interval_hours == 0.5
    np.testing.assert_array_equal(read_stack(path), data[:, :, 0].astype(np.float32))
    with StackReader(info) as reader:
        np.testing.assert_array_equal(reader.read(5, [1]), data[5, 1:2, 0].astype(np.float32))


def test_a_plate_or_a_group_without_multiscales_is_named(tmp_path):
    group = zarr.open_group(str(tmp_path / "p.ome.zarr"), mode="w", zarr_format=2)
    group.attrs["plate"] = {"wells": []}
    with pytest.raises(BadInputError, match="HCS plate.*cellmtl manifest"):
        probe_stack(tmp_path / "p.ome.zarr")
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    with pytest.raises(BadInputError, match="without NGFF multiscales"):
        probe_stack(tmp_path / "g.zarr")


@pytest.fixture(scope="module")
def zarr_run(tmp_path_factory) -> Path:
    """A tiny 2-channel model trained on OME-Zarr stacks (6 frames, 0.5 h apart)."""
    root = tmp_path_factory.mktemp("zrun")
    rows = ["stack_id,path,condition,infection_onset_hour"]
    for k in range(4):
        write_ngff(root / f"s{k}.ome.zarr", _data(6, infected=k % 2 == 0, seed=k))
        rows.append(f"s{k},s{k}.ome.zarr,{'infected' if k % 2 == 0 else 'mock'},{'0' if k % 2 == 0 else ''}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = write_config(root / "c.yaml", root / "m.csv", data={"val_stacks": ["s0", "s1"]}, training={"epochs": 1})
    assert main(["train", "--config", str(cfg)]) == 0
    return sorted((root / "outputs" / "t").iterdir())[-1] / "checkpoints" / "best.pt"


@pytest.mark.slow
def test_predict_on_an_ngff_image_gives_its_times(capsys, tmp_path, zarr_run):
    write_ngff(tmp_path / "new.ome.zarr", _data(8, seed=9))
    code = main(["predict", "--checkpoint", str(zarr_run), str(tmp_path / "new.ome.zarr"), "--out",
                 str(tmp_path / "p.csv")])
    assert code == 0, capsys.readouterr().err
    with (tmp_path / "p.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and float(rows[-1]["hours_since_start"]) == 3.5


@pytest.mark.slow
def test_an_hcs_plate_gives_one_stack_per_well_and_field(capsys, tmp_path, zarr_run):
    plate = zarr.open_group(str(tmp_path / "plate1.ome.zarr"), mode="w", zarr_format=2)
    wells = [("B", "2"), ("C", "2")]
    plate.attrs["plate"] = {"version": "0.4", "rows": [{"name": "B"}, {"name": "C"}], "columns": [{"name": "2"}],
                            "wells": [{"path": f"{r}/{c}", "rowIndex": i, "columnIndex": 0}
                                      for i, (r, c) in enumerate(wells)]}
    for r, c in wells:
        well = plate.require_group(r).require_group(c)
        well.attrs["well"] = {"version": "0.4", "images": [{"path": "0"}, {"path": "1"}]}
        for f in ("0", "1"):
            write_ngff(tmp_path / "plate1.ome.zarr" / r / c / f, _data(4, infected=r == "B", seed=ord(r) + int(f)))
    (tmp_path / "map.csv").write_text("well,condition,infection_onset_hour,moi\nB02,infected,0,3\nC2,mock,,0\n")
    code = main(["manifest", "--images", str(tmp_path / "plate1.ome.zarr"), "--plate-map", str(tmp_path / "map.csv"),
                 "--out", str(tmp_path / "m.csv")])
    assert code == 0, capsys.readouterr().err
    with (tmp_path / "m.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["stack_id"], r["well"], r["field"], r["group"], r["moi"]) for r in rows] == [
        ("plate1_B2_0", "B2", "0", "plate1_B2", "3"), ("plate1_B2_1", "B2", "1", "plate1_B2", "3"),
        ("plate1_C2_0", "C2", "0", "plate1_C2", "0"), ("plate1_C2_1", "C2", "1", "plate1_C2", "0")]
    code = main(["predict", "--checkpoint", str(zarr_run), "--manifest", str(tmp_path / "m.csv"), "--out",
                 str(tmp_path / "p.csv")])
    assert code == 0, capsys.readouterr().err
    with (tmp_path / "p.csv").open() as fh:
        pred = list(csv.DictReader(fh))
    assert len(pred) == 16 and {r["well"] for r in pred} == {"B2", "C2"}
    assert sorted({float(r["hours_since_start"]) for r in pred}) == [0, 0.5, 1, 1.5]


@pytest.mark.parametrize("suffix, vendor", [(".nd2", "Nikon"), (".czi", "Zeiss"), (".lif", "Leica")])
def test_vendor_files_get_a_plain_error_saying_how_to_convert_them(capsys, tmp_path, suffix, vendor):
    (tmp_path / f"well{suffix}").write_bytes(b"\x00" * 64)
    rows = [f"{k},well{suffix},{'mock' if k in 'ac' else 'infected'}" for k in "abcd"]
    (tmp_path / "m.csv").write_text("stack_id,path,condition\n" + "\n".join(rows) + "\n")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "m.csv", data={"val_stacks": ["a", "b"]})
    code = main(["check-data", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == 2 and vendor in err and "OME-Zarr" in err and "Traceback" not in err
