"""`cellmtl manifest`: per-image files of plate imagers + a plate map -> a manifest whose stacks read lazily."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellmtl.data.plate import (
    PRESETS,
    compile_pattern,
    image_files,
    parse_names,
    row_letters,
    time_hours,
    time_index,
    well_name,
)
from cellmtl.data.readers import probe_stack, read_stack
from cellmtl.errors import BadInputError
from tests.conftest import error_line, run_cli, write_config


@pytest.mark.parametrize("token, hours", [("00d12h30m", 12.5), ("01d00h00m", 24.0), ("12h", 12.0), ("12.5h", 12.5),
                                          ("90min", 1.5), ("45m", 0.75), ("30s", 1 / 120), ("2d", 48.0)])
def test_elapsed_time_tokens(token, hours):
    assert time_hours(token) == pytest.approx(hours)


@pytest.mark.parametrize("token, index", [("t012", 12), ("012", 12), ("5", 5), ("T3", 3)])
def test_frame_index_tokens(token, index):
    assert time_index(token) == index and time_hours(token) is None


def test_well_names_and_rows():
    assert well_name("B2") == well_name("B02") == well_name("b2") == "B2"
    assert well_name("AF48") == "AF48" and well_name("2B") is None and well_name("B") is None
    assert [row_letters(r) for r in ("2", "b", "26", "27")] == ["B", "B", "Z", "AA"]


def test_pattern_errors():
    for pattern, needle in [("{well}_{colour}.tif", "unknown part {colour}"), ("{field}_{time}.tif", "needs {well}"),
                            ("{well}_{field}.tif", "needs {time}"), ("{well}_{time}_{well}.tif", "twice")]:
        with pytest.raises(BadInputError, match=needle.replace("{", r"\{").replace("}", r"\}")):
            compile_pattern(pattern)


# ---------------------------------------------------------------- the presets, on their exporters' names


def _names(tmp_path: Path, rels: list[str]) -> list[dict]:
    for rel in rels:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    return tmp_path


@pytest.mark.parametrize("preset, name, expected", [
    # Incucyte "Export Images": VID1957_phase_E11_5_06d12h05m.tif (vessel, channel, well, image, elapsed)
    ("incucyte", "VID1957_phase_E11_5_06d12h05m.tif", ("VID1957", "E11", "5", "phase", "06d12h05m", "")),
    ("incucyte", "My_Plate_2_green_B2_1_00d00h30m.tif", ("My_Plate_2", "B2", "1", "green", "00d00h30m", "")),
    # MetaXpress: TimePoint_<n>/<plate>_<well>_s<site>_w<wavelength><id>.TIF
    ("imagexpress", "TimePoint_3/HT29_P1_B02_s2_w1A2F3B4C.TIF", ("HT29_P1", "B2", "2", "1", "3", "")),
    ("imagexpress", "TimePoint_1/P1_C10_s1_w2.TIF", ("P1", "C10", "1", "2", "1", "")),
    # Harmony (Operetta/Opera Phenix): Images/r<row>c<col>f<field>p<plane>-ch<channel>sk<timepoint>fk1fl1.tiff
    ("operetta", "Images/r02c03f01p01-ch1sk7fk1fl1.tiff", ("", "B3", "1", "1", "7", "01")),
    # Yokogawa CellVoyager: <name>_<well>_T<t>F<field>L<l>A<a>Z<z>C<channel>.tif
    ("cellvoyager", "AssayPlate_B03_T0002F004L01A01Z01C02.tif", ("AssayPlate", "B3", "4", "02", "0002", "01")),
])
def test_presets_read_their_exporters_names(tmp_path, preset, name, expected):
    root = _names(tmp_path, [name])
    slots, problems = parse_names(root, image_files(root), compile_pattern(PRESETS[preset]))
    assert problems == [] and len(slots) == 1
    s = slots[0]
    assert (s.plate, s.well, s.field, s.channel, s.time, s.plane) == expected


def test_imagexpress_thumbnails_are_not_images_of_the_plate(tmp_path):
    root = _names(tmp_path, ["TimePoint_1/P1_B02_s1_w1.TIF", "TimePoint_1/P1_B02_s1_w1_thumb6A2B.TIF"])
    assert [p.name for p in image_files(root)] == ["P1_B02_s1_w1.TIF"]


# ---------------------------------------------------------------- end to end


def _plate(root: Path, wells=("B2", "C2"), fields=(1, 2), channels=("GFP", "Phase"), minutes=range(0, 180, 30),
           seed: int = 0) -> Path:
    """Per-image TIFFs P1_<well>_<field>_<channel>_<ddDhhHmmM>.tif; infected wells (B*) bright in GFP."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for well in wells:
        for f in fields:
            for c in channels:
                for m in minutes:
                    level = 2000 if (c == "GFP" and well.startswith("B")) else 300
                    img = (rng.normal(level, 50, (24, 24)) + m).clip(0, 65535).astype(np.uint16)
                    tifffile.imwrite(root / f"P1_{well}_{f}_{c}_00d{m // 60:02d}h{m % 60:02d}m.tif", img)
    return root


PATTERN = "P1_{well}_{field}_{channel}_{time}.tif"


def _map(path: Path, text: str = "well,condition,infection_onset_hour,moi\nB02,infected,0,5\nc2,mock,,0\n") -> Path:
    path.write_text(text)
    return path


def _read(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_plate_files_and_map_to_manifest_check_data_train_predict(capsys, tmp_path):
    images = _plate(tmp_path / "images")
    code, out, err = run_cli(capsys, "manifest", "--images", images, "--pattern", PATTERN, "--plate-map",
                             _map(tmp_path / "plate.csv"), "--out", tmp_path / "manifest.csv")
    assert code == 0, err
    assert "4 stacks from 2 wells, 6 frames each" in err and "GFP, Phase" in err
    rows = _read(tmp_path / "manifest.csv")
    assert [r["stack_id"] for r in rows] == ["B2_1", "B2_2", "C2_1", "C2_2"]
    assert len({r["group"] for r in rows}) == 2 and {r["group"] for r in rows} == {"B2", "C2"}
    assert [r["moi"] for r in rows] == ["5", "5", "0", "0"] and [r["condition"] for r in rows][::2] == ["infected",
                                                                                                        "mock"]
    info = probe_stack(tmp_path / rows[0]["path"])
    assert (info.format, info.n_frames, info.n_channels, info.channel_names) == ("frames", 6, 2, ("GFP", "Phase"))
    arr = read_stack(tmp_path / rows[0]["path"])
    expected = tifffile.imread(images / "P1_B2_1_Phase_00d01h30m.tif").astype(np.float32)
    np.testing.assert_array_equal(arr[3, 1], expected)

    cfg = write_config(tmp_path / "c.yaml", tmp_path / "manifest.csv", data={"val_stacks": ["B2_2", "C2_2"],
                                                                             "train_stacks": ["B2_1", "C2_1"]},
                       training={"epochs": 1})
    code, out, err = run_cli(capsys, "check-data", "--config", cfg)
    assert code == 0, err
    assert "0.5 (file)" in out and "0-2.5" in out
    code, out, err = run_cli(capsys, "train", "--config", cfg)
    assert code == 0, err
    ckpt = Path(out.strip().splitlines()[-1]) / "checkpoints" / "best.pt"
    code, _, err = run_cli(capsys, "predict", "--checkpoint", ckpt, "--manifest", tmp_path / "manifest.csv",
                           "--out", tmp_path / "pred.csv")
    assert code == 0, err
    pred = _read(tmp_path / "pred.csv")
    assert len(pred) == 24
    assert sorted({float(r["hours_since_start"]) for r in pred}) == [0, 0.5, 1, 1.5, 2, 2.5]
    assert {r["moi"] for r in pred} == {"5", "0"} and {r["well"] for r in pred} == {"B2", "C2"}


def test_irregular_times_are_kept_per_frame_and_channels_follow_the_option(capsys, tmp_path):
    images = _plate(tmp_path / "images", wells=("B2",), fields=(1,), minutes=(0, 30, 90, 100))
    code, out, err = run_cli(capsys, "manifest", "--images", images, "--pattern", PATTERN, "--plate-map",
                             _map(tmp_path / "plate.csv"), "--out", tmp_path / "m.csv", "--channels", "phase,GFP")
    assert code == 0, err
    info = probe_stack(tmp_path / _read(tmp_path / "m.csv")[0]["path"])
    assert info.channel_names == ("Phase", "GFP")
    assert info.file_times.frame_hours == pytest.approx((0, 0.5, 1.5, 100 / 60))


def test_frame_indices_need_an_interval(capsys, tmp_path):
    root = tmp_path / "images"
    for t in (1, 2, 3):
        (root / f"TimePoint_{t}").mkdir(parents=True)
        tifffile.imwrite(root / f"TimePoint_{t}" / "P1_B02_s1_w1.TIF", np.zeros((8, 8), np.uint16))
    plate = _map(tmp_path / "plate.csv")
    args = ["manifest", "--images", root, "--preset", "imagexpress", "--plate-map", plate, "--out", tmp_path / "m.csv"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "--interval-hours" in error_line(err)
    code, _, err = run_cli(capsys, *args, "--interval-hours", "0.25")
    assert code == 0, err
    info = probe_stack(tmp_path / _read(tmp_path / "m.csv")[0]["path"])
    assert info.n_frames == 3 and info.file_times.interval_hours == 0.25


def test_dry_run_prints_the_table_and_writes_nothing(capsys, tmp_path):
    images = _plate(tmp_path / "images", fields=(1,), minutes=(0, 30))
    code, out, err = run_cli(capsys, "manifest", "--images", images, "--pattern", PATTERN, "--plate-map",
                             _map(tmp_path / "plate.csv"), "--out", tmp_path / "m.csv", "--dry-run")
    assert code == 0, err
    assert out.splitlines()[0].startswith("stack_id,path,condition") and len(out.splitlines()) == 3
    assert not (tmp_path / "m.csv").exists() and not (tmp_path / "m.stacks").exists()


def test_every_bad_input_is_named_and_nothing_is_written(capsys, tmp_path):
    images = _plate(tmp_path / "images", fields=(1,), minutes=(0, 30, 60))
    (images / "P1_C2_1_Phase_00d00h30m.tif").unlink()  # a missing time point of one channel
    tifffile.imwrite(images / "overview_scan.tif", np.zeros((8, 8), np.uint16))  # matches no pattern
    tifffile.imwrite(images / "P1_D4_1_GFP_00d00h00m.tif", np.zeros((8, 8), np.uint16))  # well not in the map
    tifffile.imwrite(images / "P1_B02_1_GFP_00d00h00m.tif", np.zeros((8, 8), np.uint16))  # B2 twice
    earlier = tmp_path / "m.csv"
    earlier.write_text("an earlier manifest\n")
    code, _, err = run_cli(capsys, "manifest", "--images", images, "--pattern", PATTERN, "--plate-map",
                           _map(tmp_path / "plate.csv"), "--out", earlier)
    line = error_line(err)
    assert code == 2
    for needle in ("overview_scan.tif matches no pattern", "well D4 (stack D4_1) has no row in the plate map",
                   "two files for one image", "P1_B02_1_GFP_00d00h00m.tif", "stack C2_1 lacks images",
                   "Phase at 0.5 h"):
        assert needle in line, (needle, line)
    assert earlier.read_text() == "an earlier manifest\n" and not (tmp_path / "m.stacks").exists()


def test_plate_map_problems_are_named_together(capsys, tmp_path):
    images = _plate(tmp_path / "images", fields=(1,), minutes=(0,))
    plate = _map(tmp_path / "plate.csv", "well,condition\nB2,infected\nB02,mock\nC2,sick\nX,mock\n")
    code, _, err = run_cli(capsys, "manifest", "--images", images, "--pattern", PATTERN, "--plate-map", plate,
                           "--out", tmp_path / "m.csv")
    line = error_line(err)
    assert code == 2 and "row 3: well B2 is listed twice" in line and "unknown condition 'sick'" in line
    assert "'X' is not a well name" in line


def test_plate_map_with_plates(capsys, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for plate in ("P1", "P2"):
        for m in (0, 30):
            tifffile.imwrite(images / f"{plate}_B2_1_GFP_00d00h{m:02d}m.tif", np.zeros((8, 8), np.uint16))
    plate_map = _map(tmp_path / "plate.csv", "plate,well,condition,virus\nP1,B2,infected,HSV-1\nP2,B2,mock,none\n")
    code, _, err = run_cli(capsys, "manifest", "--images", images, "--pattern",
                           "{plate}_{well}_{field}_{channel}_{time}.tif", "--plate-map", plate_map, "--out",
                           tmp_path / "m.csv")
    assert code == 0, err
    rows = _read(tmp_path / "m.csv")
    assert [(r["stack_id"], r["group"], r["condition"], r["virus"]) for r in rows] == [
        ("P1_B2_1", "P1_B2", "infected", "HSV-1"), ("P2_B2_1", "P2_B2", "mock", "none")]
