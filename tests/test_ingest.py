"""Reading what files and spreadsheets say: frame times from metadata, frame folders of multi-channel files,
manifests as spreadsheets save them, the words virologists use, channel-order hints, output paths."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellmtl.cli import main
from cellmtl.data.filemeta import (
    hours_per_unit,
    imagej_channel_names,
    imagej_luts,
    imagej_times,
    lut_name,
    ome_times,
    regular_or_irregular,
)
from cellmtl.data.manifest import load_manifest, parse_condition
from cellmtl.data.readers import probe_stack, read_stack
from cellmtl.data.table import read_table
from cellmtl.errors import BadInputError
from cellmtl.fileio import file_stem
from tests.conftest import SHARED_DATA, error_line, run_cli, tiny_stack, write_config

# ---------------------------------------------------------------- metadata rules, by hand


@pytest.mark.parametrize("unit, hours", [("s", 1 / 3600), ("sec", 1 / 3600), ("min", 1 / 60), ("h", 1.0),
                                         ("hour", 1.0), ("ms", 1 / 3.6e6), ("d", 24.0), ("Minutes", 1 / 60)])
def test_time_units(unit, hours):
    assert hours_per_unit(unit) == pytest.approx(hours)


def test_unknown_time_unit_gives_no_interval():
    assert hours_per_unit("pixel") is None
    assert imagej_times({"finterval": 2.0, "tunit": "pixel"}) is None


def test_imagej_finterval_defaults_to_seconds_and_reads_tunit():
    assert imagej_times({"finterval": 1800}).interval_hours == pytest.approx(0.5)
    assert imagej_times({"finterval": 15, "tunit": "min"}).interval_hours == pytest.approx(0.25)
    assert imagej_times({"finterval": 0}) is None and imagej_times({}) is None


def _ome(pixels_attrs: str, planes: str = "") -> str:
    return (f'<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0">'
            f'<Pixels ID="Pixels:0" {pixels_attrs}>{planes}</Pixels></Image></OME>')


def test_ome_time_increment_with_unit():
    assert ome_times(_ome('TimeIncrement="0.5" TimeIncrementUnit="h"'), 10).interval_hours == 0.5
    assert ome_times(_ome('TimeIncrement="90"'), 10).interval_hours == pytest.approx(90 / 3600)  # default unit s
    assert ome_times(_ome('TimeIncrement="0.5" TimeIncrementUnit="h"'), 1) is None  # one frame: no step


def test_ome_delta_t_irregular_is_kept_per_frame_and_regular_is_one_interval():
    seconds = [0, 600, 1200, 2400, 3000]
    planes = "".join(f'<Plane TheT="{t}" TheC="{c}" DeltaT="{s + c}" DeltaTUnit="s"/>'
                     for t, s in enumerate(seconds) for c in range(2))
    times = ome_times(_ome('TimeIncrement="600"', planes), 5)
    assert times.source == "OME DeltaT"
    assert times.frame_hours == pytest.approx((0, 1 / 6, 2 / 6, 4 / 6, 5 / 6))
    assert times.interval_hours == pytest.approx(1 / 6)  # the median step
    regular = regular_or_irregular([0.0, 0.5, 1.0001, 1.5], "x")
    assert regular.frame_hours is None and regular.interval_hours == pytest.approx(0.5, rel=1e-3)
    assert regular_or_irregular([0.0, 0.0, 0.0], "x") is None


def test_imagej_labels_name_channels_only_when_they_repeat_per_plane():
    assert imagej_channel_names({"Labels": ["DAPI", "GFP"] * 3}, 2) == ("DAPI", "GFP")
    assert imagej_channel_names({"Labels": ["c1 t1", "c2 t1", "c1 t2", "c2 t2"]}, 2) is None
    assert imagej_channel_names({"Labels": ["DAPI", "DAPI"]}, 2) is None


def test_lut_names():
    ramp = np.linspace(0, 255, 256).astype(np.uint8)
    zero = np.zeros(256, np.uint8)
    assert lut_name(np.stack([ramp, zero, ramp])) == "magenta"
    assert lut_name(np.stack([zero, ramp, ramp])) == "cyan"
    assert lut_name(np.stack([ramp // 2, zero, zero])) == "#7f0000"
    assert imagej_luts({"LUTs": [np.stack([ramp, zero, ramp]), np.stack([zero, zero, ramp])]}, 2) == (
        "magenta", "blue")


# ---------------------------------------------------------------- times from files, end to end


def _imagej_with_interval(path: Path, seconds: float, frames: int = 10) -> Path:
    arr = tiny_stack(np.random.default_rng(1), frames)
    tifffile.imwrite(path, arr, imagej=True, metadata={"axes": "TCYX", "finterval": seconds})
    return path


def _ome_with_increment(path: Path, hours: float, frames: int = 10) -> Path:
    arr = tiny_stack(np.random.default_rng(2), frames)
    tifffile.imwrite(path, arr, ome=True, metadata={"axes": "TCYX", "TimeIncrement": hours,
                                                    "TimeIncrementUnit": "h"})
    return path


def _ome_with_delta_t(path: Path, seconds: list[float]) -> Path:
    arr = tiny_stack(np.random.default_rng(3), len(seconds))
    planes = [float(s) for s in seconds for _ in range(2)]
    tifffile.imwrite(path, arr, ome=True, metadata={"axes": "TCYX", "Plane": {"DeltaT": planes,
                                                                              "DeltaTUnit": ["s"] * len(planes)}})
    return path


def test_probe_reads_the_interval_stored_in_imagej_and_ome_files(tmp_path):
    assert probe_stack(_imagej_with_interval(tmp_path / "ij.tif", 1800)).file_times.interval_hours == 0.5
    assert probe_stack(_ome_with_increment(tmp_path / "o.ome.tif", 0.5)).file_times.interval_hours == 0.5


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny multitask model (2 channels, 32 px), trained once for this module's predict checks."""
    from tests.conftest import write_hyperstack

    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    rows = ["stack_id,path,condition,infection_onset_hour,group"]
    for k in range(8):
        infected = k % 2 == 0
        write_hyperstack(root / f"s{k}.tif", tiny_stack(rng, 6, infected=infected))
        rows.append(f"s{k},s{k}.tif,{'infected' if infected else 'mock'},{'1' if infected else ''},g{k // 2}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = write_config(root / "cfg.yaml", root / "manifest.csv", training={"epochs": 1})
    assert main(["train", "--config", str(cfg)]) == 0
    runs = sorted((root / "outputs" / "t").iterdir())
    return runs[-1]


def _predict(capsys, run: Path, out: Path, *inputs: str) -> tuple[list[dict], str]:
    code, _, err = run_cli(capsys, "predict", "--checkpoint", run / "checkpoints" / "best.pt", *inputs,
                           "--out", out)
    assert code == 0, err
    with out.open() as fh:
        return list(csv.DictReader(fh)), err


@pytest.mark.slow
def test_predict_takes_frame_times_from_the_files(capsys, tmp_path, trained_run):
    _imagej_with_interval(tmp_path / "ij.tif", 1800)
    _ome_with_increment(tmp_path / "o.ome.tif", 0.5)
    _ome_with_delta_t(tmp_path / "dt.ome.tif", [0, 600, 1200, 2400, 3000, 3600])
    (tmp_path / "m.csv").write_text("stack_id,path\nij,ij.tif\nome,o.ome.tif\ndt,dt.ome.tif\n")
    rows, _ = _predict(capsys, trained_run, tmp_path / "p.csv", "--manifest", tmp_path / "m.csv")
    hours = {sid: [float(r["hours_since_start"]) for r in rows if r["stack_id"] == sid] for sid in ("ij", "ome", "dt")}
    assert hours["ij"] == pytest.approx([0.5 * i for i in range(10)])
    assert hours["ome"] == pytest.approx([0.5 * i for i in range(10)])
    assert hours["dt"] == pytest.approx([0, 1 / 6, 2 / 6, 4 / 6, 5 / 6, 1.0], abs=1e-5)  # irregular, per frame

    # by path too (no manifest at all)
    rows, _ = _predict(capsys, trained_run, tmp_path / "q.csv", tmp_path / "ij.tif")
    assert [float(r["hours_since_start"]) for r in rows][-1] == pytest.approx(4.5)


@pytest.mark.slow
def test_manifest_interval_wins_over_the_file_with_a_warning_naming_the_stack(capsys, tmp_path, trained_run,
                                                                              caplog):
    _imagej_with_interval(tmp_path / "ij.tif", 1800)
    (tmp_path / "m.csv").write_text("stack_id,path,frame_interval_hours\nwell_b3,ij.tif,1.0\n")
    rows, _ = _predict(capsys, trained_run, tmp_path / "p.csv", "--manifest", tmp_path / "m.csv")
    assert float(rows[-1]["hours_since_start"]) == 9.0
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "well_b3" in r.getMessage()]
    assert len(warning) == 1 and "0.5 h" in warning[0] and "1 h from the manifest" in warning[0]
    # agreeing values (within 1 %): no warning
    caplog.clear()
    (tmp_path / "m.csv").write_text("stack_id,path,frame_interval_hours\nwell_b3,ij.tif,0.502\n")
    _predict(capsys, trained_run, tmp_path / "p.csv", "--manifest", tmp_path / "m.csv")
    assert not [r for r in caplog.records if "well_b3" in r.getMessage() and r.levelno == logging.WARNING]


def test_check_data_shows_each_interval_and_its_source(capsys, tmp_path):
    rng = np.random.default_rng(0)
    rows = ["stack_id,path,condition,frame_interval_hours"]
    for k in range(4):
        p = tmp_path / f"s{k}.tif"
        meta = {"axes": "TCYX", **({"finterval": 1800} if k < 2 else {})}
        tifffile.imwrite(p, tiny_stack(rng, 10, infected=k % 2 == 0), imagej=True, metadata=meta)
        rows.append(f"s{k},{p.name},{'infected' if k % 2 == 0 else 'mock'},{'0.25' if k == 3 else ''}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "m.csv", data={"val_stacks": ["s0", "s1"]})
    code, out, err = run_cli(capsys, "check-data", "--config", cfg)
    assert code == 0, err
    table = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("s")}
    assert "0-4.5" in table["s0"] and "0.5 (file)" in table["s0"]
    assert "0-9" in table["s2"] and "1 (config)" in table["s2"]
    assert "0-2.25" in table["s3"] and "0.25 (manifest)" in table["s3"]


# ---------------------------------------------------------------- frame folders of multi-channel files


def _frame_folder(folder: Path, frames: int = 20, planes: int = 2, infected: bool = False, seed: int = 0) -> np.ndarray:
    """One two-plane TIFF per time point, written without axes metadata (as many exporters do)."""
    folder.mkdir(parents=True)
    arr = tiny_stack(np.random.default_rng(seed), frames, c=planes, infected=infected)
    for t in range(frames):
        tifffile.imwrite(folder / f"frame_{t:03d}.tif", arr[t])
    return arr


def test_a_folder_of_two_plane_files_is_frames_by_channels(tmp_path):
    arr = _frame_folder(tmp_path / "well")
    info = probe_stack(tmp_path / "well")
    assert (info.format, info.n_frames, info.n_channels, info.n_z) == ("folder", 20, 2, 1)
    np.testing.assert_array_equal(read_stack(tmp_path / "well"), arr.astype(np.float32))


def test_a_frame_file_that_says_z_keeps_z(tmp_path):
    (tmp_path / "w").mkdir()
    arr = np.random.default_rng(0).integers(0, 1000, (3, 4, 2, 8, 8)).astype(np.uint16)  # T Z C Y X
    for t in range(3):
        tifffile.imwrite(tmp_path / "w" / f"t{t}.tif", arr[t], imagej=True, metadata={"axes": "ZCYX"})
    info = probe_stack(tmp_path / "w")
    assert (info.n_frames, info.n_z, info.n_channels) == (3, 4, 2)
    np.testing.assert_array_equal(read_stack(tmp_path / "w"), arr.max(axis=1).astype(np.float32))


@pytest.mark.slow
def test_frame_folders_in_check_data_train_and_predict(capsys, tmp_path):
    rows = ["stack_id,path,condition,infection_onset_hour"]
    for k in range(4):
        _frame_folder(tmp_path / f"w{k}", infected=k % 2 == 0, seed=k)
        rows.append(f"w{k},w{k},{'infected' if k % 2 == 0 else 'mock'},{'0' if k % 2 == 0 else ''}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "m.csv", data={"val_stacks": ["w0", "w1"]},
                       training={"epochs": 1})
    code, out, err = run_cli(capsys, "check-data", "--config", cfg)
    assert code == 0, err
    row = next(ln for ln in out.splitlines() if ln.startswith("w0"))
    assert row.split()[3:6] == ["folder", "20", "2"], row
    code, out, err = run_cli(capsys, "train", "--config", cfg)
    assert code == 0, err
    run = Path(out.strip().splitlines()[-1])
    rows, _ = _predict(capsys, run, tmp_path / "p.csv", tmp_path / "w3")
    assert len(rows) == 20 and rows[0]["path"] == str((tmp_path / "w3").resolve())


# ---------------------------------------------------------------- manifests as spreadsheets save them


MANIFEST = [
    ["stack_id", "path", "condition", "infection_onset_hour", "frame_interval_hours", "start_hour", "note"],
    ["A1", "stacks/A1.tif", "infected", "1.5", "0.5", "0", "Straße, 37 °C"],
    ["A2", "stacks/A2.tif", "Mock-infected", "", "0.5", "2.25", "µ-Slide"],
]


def _as_text(rows: list[list[str]], delimiter: str, decimal_comma: bool = False) -> str:
    def cell(v: str) -> str:
        return v.replace(".", ",") if decimal_comma and v.replace(".", "").isdigit() else v

    lines = []
    for r in rows:
        cells = [cell(v) for v in r]
        lines.append(delimiter.join(f'"{v}"' if delimiter in v else v for v in cells))
    return "\r\n".join(lines) + "\r\n"


def _records(path: Path) -> list[tuple]:
    return [(r.stack_id, Path(r.path).name, r.infected, r.onset_hour, r.frame_interval_hours, r.start_hour,
             r.extra["note"]) for r in load_manifest(path)]


@pytest.fixture
def stacks_dir(tmp_path: Path) -> Path:
    (tmp_path / "stacks").mkdir()
    for name in ("A1", "A2"):
        (tmp_path / "stacks" / f"{name}.tif").write_bytes(b"")
    return tmp_path


def test_manifests_as_excel_saves_them_read_the_same(stacks_dir):
    expected = [("A1", "A1.tif", True, 1.5, 0.5, 0.0, "Straße, 37 °C"), ("A2", "A2.tif", False, None, 0.5, 2.25,
                                                                          "µ-Slide")]
    variants = {
        "utf8.csv": _as_text(MANIFEST, ",").encode("utf-8"),
        "utf8bom.csv": b"\xef\xbb\xbf" + _as_text(MANIFEST, ",").encode("utf-8"),
        "cp1252.csv": _as_text(MANIFEST, ",").encode("cp1252"),
        "utf16.txt": _as_text(MANIFEST, "\t").encode("utf-16"),  # Excel's "Unicode text": BOM + tabs
        "semicolon.csv": _as_text(MANIFEST, ";", decimal_comma=True).encode("cp1252"),
        "tab.tsv": _as_text(MANIFEST, "\t", decimal_comma=True).encode("utf-8"),
        "windows_paths.csv": _as_text([r[:1] + [r[1].replace("/", "\\")] + r[2:] for r in MANIFEST], ",").encode(),
    }
    for name, data in variants.items():
        (stacks_dir / name).write_bytes(data)
        assert _records(stacks_dir / name) == expected, name


def test_xlsx_manifest_first_sheet(stacks_dir):
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    sheet = book.active
    for r in MANIFEST:
        sheet.append([float(v) if v.replace(".", "").isdigit() else v for v in r])
    book.create_sheet("notes").append(["not", "the", "manifest"])
    book.save(stacks_dir / "m.xlsx")
    assert _records(stacks_dir / "m.xlsx")[1] == ("A2", "A2.tif", False, None, 0.5, 2.25, "µ-Slide")
    assert read_table(stacks_dir / "m.xlsx").columns == MANIFEST[0]


def test_decimal_commas_only_in_semicolon_or_tab_files(stacks_dir):
    (stacks_dir / "m.csv").write_text('stack_id,path,condition,start_hour\nA1,stacks/A1.tif,mock,"0,5"\n')
    with pytest.raises(BadInputError, match="start_hour"):
        load_manifest(stacks_dir / "m.csv")


def test_undecodable_manifest_is_exit_2_naming_it_and_what_was_tried(capsys, stacks_dir):
    (stacks_dir / "m.csv").write_bytes(b"stack_id,path,condition\nA1,stacks/A1.tif,mo\x81ck\n")
    cfg = write_config(stacks_dir / "c.yaml", stacks_dir / "m.csv")
    code, _, err = run_cli(capsys, "check-data", "--config", cfg)
    line = error_line(err)
    assert code == 2 and "m.csv" in line and "UTF-8" in line and "cp1252" in line


def test_a_semicolon_manifest_with_a_missing_column_says_how_it_was_read(stacks_dir):
    (stacks_dir / "m.csv").write_text("stack_id;path\nA1;stacks/A1.tif\n")
    with pytest.raises(BadInputError, match="missing required column.*condition.*semicolon-separated"):
        load_manifest(stacks_dir / "m.csv")


# ---------------------------------------------------------------- the words for controls


@pytest.mark.parametrize("word", ["NI", "ni", "ctrl", "non-infected", "Non infected", "noninfected", "not infected",
                                  "Mock-infected", "mock", "MOCK", "control", "negative", "uninfected", "Un-infected"])
def test_control_words_mean_uninfected(word):
    assert parse_condition(word, "here") is False


@pytest.mark.parametrize("word", ["infected", "Infected", "inf", "INF"])
def test_infected_words(word):
    assert parse_condition(word, "here") is True


def test_every_bad_condition_row_is_named_in_one_error(capsys, stacks_dir):
    rows = ["stack_id,path,condition"] + [f"A{k},stacks/A1.tif,{w}" for k, w in
                                          enumerate(["NI", "sick", "ctrl", "healthy?", "Mock-infected"])]
    (stacks_dir / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = write_config(stacks_dir / "c.yaml", stacks_dir / "m.csv")
    code, _, err = run_cli(capsys, "check-data", "--config", cfg)
    line = error_line(err)
    assert code == 2 and "2 problems" in line
    assert "row 3 (stack_id A1): unknown condition 'sick'" in line
    assert "row 5 (stack_id A3): unknown condition 'healthy?'" in line


def test_many_bad_rows_name_the_first_and_count_the_rest(stacks_dir):
    rows = ["stack_id,path,condition"] + [f"A{k},stacks/A1.tif,bad{k}" for k in range(9)]
    (stacks_dir / "m.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(BadInputError) as exc:
        load_manifest(stacks_dir / "m.csv")
    msg = str(exc.value)
    assert "9 problems" in msg and "bad4" in msg and "bad5" not in msg and "and 4 more" in msg


# ---------------------------------------------------------------- channels: LUT order, labels, RGB


needs_real = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} absent")


@needs_real
def test_check_data_reports_the_hsv1_stain_order_from_the_luts(capsys, tmp_path):
    src = SHARED_DATA / "hsv1_mef_fixed_timepoints"
    with (src / "manifest.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["group"] == "confocal_pla"]
    lines = ["stack_id,path,condition,infection_onset_hour,start_hour"]  # no channels column
    lines += [f"{r['stack_id']},{src / r['path']},{r['condition']},{r['infection_onset_hour']},{r['start_hour']}"
              for r in rows]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "m.csv", task={"mode": "regression"},
                       data={"val_stacks": ["pla_4hpi_pos55", "pla_12hpi_pos48"]})
    code, out, err = run_cli(capsys, "check-data", "--config", cfg)
    assert code == 0, err
    assert "no problems found" not in out
    problems = out[out.index("problem(s):"):]
    assert "pla_12hpi_pos48" in problems and "blue|cyan|yellow|magenta" in problems
    assert "magenta|yellow|blue|cyan" in problems and "pla_4hpi_pos55 (" not in problems


def test_imagej_slice_labels_match_channels_by_name(tmp_path):
    from cellmtl.data.channels import match_channels
    from cellmtl.data.dataset import probe_records

    arr = np.stack([np.full((3, 8, 8), 100, np.uint16), np.full((3, 8, 8), 200, np.uint16)], axis=1)  # T C Y X
    tifffile.imwrite(tmp_path / "a.tif", arr, imagej=True, metadata={"axes": "TCYX", "Labels": ["DAPI", "GFP"] * 3})
    tifffile.imwrite(tmp_path / "b.tif", arr[:, ::-1], imagej=True,
                     metadata={"axes": "TCYX", "Labels": ["GFP", "DAPI"] * 3})
    (tmp_path / "m.csv").write_text("stack_id,path,condition\na,a.tif,mock\nb,b.tif,mock\n")
    records = load_manifest(tmp_path / "m.csv")
    infos, channels, names = match_channels(records, probe_records(records), None)
    assert names == ["DAPI", "GFP"] and channels == [0, 1]
    from cellmtl.data.readers import StackReader

    with StackReader(infos[1]) as r:
        assert r.read(0, channels)[:, 0, 0].tolist() == [100.0, 200.0]  # DAPI first, as in stack a


@pytest.mark.slow
def test_an_rgb_file_into_a_two_channel_model_is_an_error(capsys, tmp_path, trained_run):
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "colour.png")
    code, _, err = run_cli(capsys, "predict", "--checkpoint", trained_run / "checkpoints" / "best.pt",
                           tmp_path / "colour.png", "--out", tmp_path / "p.csv")
    line = error_line(err)
    assert code == 2 and "colour" in line and "RGB" in line and "2 channel" in line
    assert not (tmp_path / "p.csv").exists()


# ---------------------------------------------------------------- outputs: path column, distinct file names


def test_file_stems_are_distinct_for_names_that_clean_to_the_same_text():
    assert file_stem("Well ä") != file_stem("Well ö")
    assert file_stem("Well ä").startswith("Well_-") and file_stem("A1") == "A1"


@pytest.mark.slow
def test_predict_writes_the_path_and_explain_a_file_per_stack(capsys, tmp_path, trained_run):
    rng = np.random.default_rng(5)
    for plate in ("plate1", "plate2"):
        (tmp_path / plate).mkdir()
        tifffile.imwrite(tmp_path / plate / "A1.tif", tiny_stack(rng, 3), imagej=True, metadata={"axes": "TCYX"})
    rows, _ = _predict(capsys, trained_run, tmp_path / "p.csv", tmp_path / "plate1" / "A1.tif",
                       tmp_path / "plate2" / "A1.tif")
    assert {(r["stack_id"], Path(r["path"]).parent.name) for r in rows} == {("A1", "plate1"), ("A1_2", "plate2")}
    with (tmp_path / "p.stacks.csv").open() as fh:
        assert [Path(r["path"]).parent.name for r in csv.DictReader(fh)] == ["plate1", "plate2"]

    (tmp_path / "m.csv").write_text("stack_id,path\nWell ä,plate1/A1.tif\nWell ö,plate2/A1.tif\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "explain", "--checkpoint", trained_run / "checkpoints" / "best.pt",
                           "--manifest", tmp_path / "m.csv", "--out", tmp_path / "ex")
    assert code == 0, err
    pngs = sorted(p.name for p in (tmp_path / "ex").glob("*.png"))
    assert len(pngs) == 2 and pngs == sorted({file_stem("Well ä") + ".png", file_stem("Well ö") + ".png"})
    page = (tmp_path / "ex" / "index.html").read_text(encoding="utf-8")
    assert all(p in page for p in pngs)


# ---------------------------------------------------------------- check-data says what it does


def test_check_data_prints_its_table_then_names_every_unreadable_stack(capsys, tiny_config, tiny_experiment):
    stacks = tiny_experiment.parent / "stacks"
    for sid in ("s3", "s6"):
        arr = np.ones((6, 2, 24, 24), np.float32)
        arr[2, 0, 1, 1] = np.nan
        tifffile.imwrite(stacks / f"{sid}.tif", arr, imagej=True, metadata={"axes": "TCYX"})
    code, out, err = run_cli(capsys, "check-data", "--config", tiny_config)
    line = error_line(err)
    assert code == 2 and "s3" in line and "s6" in line and "NaN" in line
    assert sum(ln.split()[0] in {f"s{k}" for k in range(8)} for ln in out.splitlines() if ln.strip()) == 8
    assert "no problems found" not in out


def test_check_data_notes_z_resizing_and_imbalance_and_lists_warnings_as_problems(capsys, tmp_path):
    rng = np.random.default_rng(0)
    rows = ["stack_id,path,condition,group"]
    for k, (frames, z) in enumerate([(2, 1), (2, 3), (40, 1), (2, 1)]):
        arr = rng.integers(0, 500, (frames, z, 2, 24, 20)).astype(np.uint16)
        tifffile.imwrite(tmp_path / f"s{k}.tif", arr, imagej=True, metadata={"axes": "TZCYX"})
        rows.append(f"s{k},s{k}.tif,{'infected' if k % 2 == 0 else 'mock'},g{min(k, 2)}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "m.csv",
                       data={"train_stacks": ["s0", "s1", "s2"], "val_stacks": ["s3"]}, task={"mode": "regression"})
    code, out, err = run_cli(capsys, "check-data", "--config", cfg)
    assert code == 0, err
    assert "max-projected" in out and "s1 (3 planes)" in out
    assert "resized from 24 x 20 (Y x X) to 32 x 32 px (non-uniform" in out
    problems = out[out.index("problem(s):"):]
    assert "20x" in problems and "s2 has 40 frames" in problems
    assert "g2" in problems and "leakage" in problems and "leakage" not in err  # in the list, not around it


def _lut(rgb: tuple[int, int, int]) -> np.ndarray:
    return (np.linspace(0, 1, 256)[None, :] * np.asarray(rgb, float)[:, None]).astype(np.uint8)


@pytest.mark.slow
def test_predict_warns_when_a_stack_shows_its_channels_in_other_colours_than_training(capsys, tmp_path, caplog):
    blue, green = _lut((0, 0, 255)), _lut((0, 255, 0))
    rng = np.random.default_rng(0)
    rows = ["stack_id,path,condition,group"]
    for k in range(4):
        meta = {"axes": "TCYX", "mode": "composite", "LUTs": [blue, green]}
        tifffile.imwrite(tmp_path / f"s{k}.tif", tiny_stack(rng, 4, infected=k % 2 == 0), imagej=True, metadata=meta)
        rows.append(f"s{k},s{k}.tif,{'infected' if k % 2 == 0 else 'mock'},g{k}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "m.csv", data={"val_stacks": ["s0", "s1"]},
                       training={"epochs": 1})
    code, out, err = run_cli(capsys, "train", "--config", cfg)
    assert code == 0, err
    ckpt = Path(out.strip().splitlines()[-1]) / "checkpoints" / "best.pt"
    swapped = tiny_stack(rng, 4)[:, ::-1]
    tifffile.imwrite(tmp_path / "new.tif", swapped, imagej=True,
                     metadata={"axes": "TCYX", "mode": "composite", "LUTs": [green, blue]})
    caplog.clear()
    code, _, err = run_cli(capsys, "predict", "--checkpoint", ckpt, tmp_path / "new.tif", tmp_path / "s1.tif",
                           "--out", tmp_path / "p.csv")
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "colours" in r.getMessage()]
    assert len(warned) == 1 and "stack_id new " in warned[0] and "green|blue" in warned[0]
    assert "the model's training stacks in blue|green" in warned[0]
