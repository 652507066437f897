"""Channels matched by name: files that order their stains differently are read alike (manifest `channels`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cellmtl.cli import main
from cellmtl.config import config_from_dict
from cellmtl.data.channels import match_channels
from cellmtl.data.dataset import probe_records
from cellmtl.data.filemeta import ome_channel_names
from cellmtl.data.manifest import load_manifest
from cellmtl.data.readers import StackReader
from cellmtl.errors import BadInputError
from tests.conftest import SHARED_DATA, tiny_stack, write_config, write_hyperstack

LEVEL = {"DAPI": 100.0, "GFP": 200.0, "RFP": 300.0, "BF": 400.0}  # each stain's constant pixel value


def stained_stack(path: Path, order: list[str], frames: int = 2) -> Path:
    arr = np.zeros((frames, len(order), 8, 8), np.uint16)
    for c, name in enumerate(order):
        arr[:, c] = LEVEL[name]
    return write_hyperstack(path, arr)


def manifest(tmp_path: Path, stacks: dict[str, list[str] | None], name: str = "m.csv") -> Path:
    """One uninfected stack per entry; None writes no names (an empty `channels` cell)."""
    rows = ["stack_id,path,condition,channels"]
    for sid, order in stacks.items():
        stained_stack(tmp_path / f"{sid}.tif", order or ["DAPI", "GFP"])
        rows.append(f"{sid},{sid}.tif,mock,{'|'.join(order) if order else ''}")
    path = tmp_path / name
    path.write_text("\n".join(rows) + "\n")
    return path


def matched_levels(manifest_path: Path, selection) -> tuple[list[list[float]], list[str] | None]:
    """Each stack's first-frame pixel value of every selected channel after matching (stain levels), and the names."""
    records = load_manifest(manifest_path)
    infos, channels, names = match_channels(records, probe_records(records), selection)
    levels = []
    for info in infos:
        with StackReader(info) as r:
            levels.append([float(v) for v in r.read(0, channels)[:, 0, 0]])
    return levels, names


def read_levels(tmp_path: Path, stacks: dict[str, list[str] | None], selection) -> tuple[list[list[float]], list]:
    return matched_levels(manifest(tmp_path, stacks), selection)


def test_names_select_the_same_stains_whatever_the_file_order(tmp_path):
    stacks = {"a": ["DAPI", "GFP", "RFP"], "b": ["RFP", "DAPI", "GFP"], "c": ["GFP", "RFP", "DAPI", "BF"]}
    levels, names = read_levels(tmp_path, stacks, ["RFP", "DAPI"])
    assert names == ["RFP", "DAPI"]
    assert levels == [[300.0, 100.0]] * 3


def test_indices_refer_to_the_first_stack_and_other_files_are_read_by_name(tmp_path):
    stacks = {"a": ["DAPI", "GFP", "RFP"], "b": ["RFP", "GFP", "DAPI"]}
    levels, names = read_levels(tmp_path, stacks, [0, 2])
    assert names == ["DAPI", "RFP"]
    assert levels == [[100.0, 300.0]] * 2
    levels, names = read_levels(tmp_path / "all", {"a": ["DAPI", "GFP"], "b": ["GFP", "DAPI"]}, None)
    assert names == ["DAPI", "GFP"] and levels == [[100.0, 200.0]] * 2


def test_without_names_channels_stay_indices(tmp_path):
    levels, names = read_levels(tmp_path, {"a": None, "b": None}, [1])
    assert names is None and levels == [[200.0], [200.0]]


@pytest.mark.parametrize(
    ("stacks", "selection", "needles"),
    [
        ({"a": ["DAPI", "GFP"], "b": ["DAPI", "RFP"]}, ["GFP"], ["stack_id b", "'GFP'", "DAPI|RFP"]),
        ({"a": ["DAPI", "GFP"], "b": ["GFP", "RFP"]}, None, ["stack_id b", "'DAPI'"]),
        ({"a": ["DAPI", "GFP"], "b": None}, None, ["stack_id b", "no channel names", "stack_id a"]),
        ({"a": None, "b": None}, ["GFP"], ["by name", "'channels' column"]),
        ({"a": ["DAPI", "GFP"]}, ["BF"], ["stack_id a", "'BF'"]),
        ({"a": ["DAPI", "GFP"]}, [2], ["stack_id a", "channel 2", "DAPI|GFP", "['488']"]),
    ],
)
def test_name_mismatches_are_bad_input_naming_the_stack(tmp_path, stacks, selection, needles):
    records = load_manifest(manifest(tmp_path, stacks))
    with pytest.raises(BadInputError) as err:
        match_channels(records, probe_records(records), selection)
    for n in needles:
        assert n in str(err.value), str(err.value)


@pytest.mark.parametrize(("cell", "needle"), [("DAPI|GFP|RFP", "names 3 channel(s) but the file has 2"),
                                              ("DAPI|DAPI", "twice"), ("DAPI||", "empty name")])
def test_a_channels_cell_that_does_not_fit_the_file_is_bad_input(tmp_path, cell, needle):
    stained_stack(tmp_path / "a.tif", ["DAPI", "GFP"])
    (tmp_path / "m.csv").write_text(f"stack_id,path,condition,channels\na,a.tif,mock,{cell}\n")
    records = load_manifest(tmp_path / "m.csv")
    with pytest.raises(BadInputError, match="stack_id a") as err:
        match_channels(records, probe_records(records), None)
    assert needle in str(err.value)


def test_config_takes_indices_or_names_but_not_a_mix():
    assert config_from_dict({"data": {"manifest": "m.csv", "channels": ["DAPI", "ICP4"]}}, "t").data.channels == [
        "DAPI", "ICP4"]
    assert config_from_dict({"data": {"manifest": "m.csv", "channels": [0, 2]}}, "t").data.channels == [0, 2]
    assert config_from_dict({"data": {"manifest": "m.csv", "channels": [" DAPI "]}}, "t").data.channels == ["DAPI"]
    for bad, needle in ((["DAPI", 1], "all indices or all names"), ([True, False], "quote names"),
                        (["DAPI", "DAPI"], "distinct"), ([" "], "empty"), ([-1], "non-negative")):
        with pytest.raises(BadInputError, match="channels") as err:
            config_from_dict({"data": {"manifest": "m.csv", "channels": bad}}, "t")
        assert needle in str(err.value)


def test_the_real_confocal_files_read_dapi_and_icp4_though_one_file_orders_them_first(tmp_path):
    """shared/data: the 12 hpi file is DAPI|ICP4|PLA|Mito, the others Mito|PLA|DAPI|ICP4."""
    src = SHARED_DATA / "hsv1_mef_fixed_timepoints"
    if not (src / "manifest.csv").is_file():
        pytest.skip("shared data not present")
    records = [r for r in load_manifest(src / "manifest.csv") if r.group == "confocal_pla"]
    infos, channels, names = match_channels(records, probe_records(records), ["DAPI", "ICP4"])
    assert channels == [2, 3] and names == ["DAPI", "ICP4"]
    for rec, info in zip(records, infos, strict=True):
        with StackReader(info) as r:
            got = r.read(0, channels)
        with StackReader(probe_records([rec])[0]) as r:
            whole = r.read(0)
        order = rec.extra["channels"].split("|")
        assert np.array_equal(got, whole[[order.index("DAPI"), order.index("ICP4")]]), rec.stack_id


def _experiment(tmp_path: Path) -> Path:
    """8 two-channel stacks (signal as tiny_stack: ch 'time' rises, ch 'virus' bright when infected);
    every other file stores them the other way round and says so."""
    rng = np.random.default_rng(3)
    rows = ["stack_id,path,condition,infection_onset_hour,frame_interval_hours,start_hour,group,channels"]
    for k in range(8):
        infected = k % 2 == 0
        arr = tiny_stack(rng, 5, infected=infected)
        order = ["time", "virus"]
        if k % 4 >= 2:
            arr, order = arr[:, ::-1].copy(), ["virus", "time"]
        write_hyperstack(tmp_path / "stacks" / f"s{k}.tif", arr)
        rows.append(f"s{k},stacks/s{k}.tif,{'infected' if infected else 'mock'},{'1' if infected else ''},1,0,"
                    f"g{k // 2},{'|'.join(order)}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "manifest.csv"


def _predictions(path: Path) -> dict[str, tuple[float, float]]:
    with path.open() as fh:
        return {(r["stack_id"], r["frame"]): (float(r["prob_infected"]), float(r["pred_time_hours"]))
                for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_train_and_predict_match_channels_by_name(tmp_path, capsys, caplog):
    man = _experiment(tmp_path)
    cfg = write_config(tmp_path / "cfg.yaml", man, data={"channels": ["virus", "time"]}, training={"epochs": 1})
    assert main(["train", "--config", str(cfg)]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["channels"] == [1, 0] and ckpt["channel_names"] == ["virus", "time"]

    # One new stack written twice, in both orders, each named: the same predictions, frame by frame.
    arr = tiny_stack(np.random.default_rng(9), 4, infected=True)
    write_hyperstack(tmp_path / "new" / "tv.tif", arr)
    write_hyperstack(tmp_path / "new" / "vt.tif", arr[:, ::-1].copy())
    (tmp_path / "new" / "m.csv").write_text("stack_id,path,channels\nx,tv.tif,time|virus\ny,vt.tif,virus|time\n")
    ck = str(run / "checkpoints" / "best.pt")
    assert main(["predict", "--checkpoint", ck, "--manifest", str(tmp_path / "new" / "m.csv"),
                 "--out", str(tmp_path / "p.csv")]) == 0
    preds = _predictions(tmp_path / "p.csv")
    for f in range(4):
        assert preds[("x", str(f))] == pytest.approx(preds[("y", str(f))], abs=1e-6)

    # Unnamed new stacks are read at the checkpoint's indices (the first training file's order), with a warning.
    caplog.clear()
    out = str(tmp_path / "q.csv")
    assert main(["predict", "--checkpoint", ck, str(tmp_path / "new" / "tv.tif"), "--out", out]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("virus, time by name" in w and "[1, 0]" in w for w in warned), warned
    unnamed = _predictions(tmp_path / "q.csv")
    for f in range(4):
        assert unnamed[("tv", str(f))] == pytest.approx(preds[("x", str(f))], abs=1e-6)

    # A new stack lacking one of the model's channels: exit 2, one error line naming it.
    (tmp_path / "new" / "bad.csv").write_text("stack_id,path,channels\nz,tv.tif,time|dapi\n")
    code = main(["predict", "--checkpoint", ck, "--manifest", str(tmp_path / "new" / "bad.csv"),
                 "--out", str(tmp_path / "r.csv")])
    err = capsys.readouterr().err
    assert code == 2 and [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        ln for ln in err.splitlines() if "stack_id z" in ln and "'virus'" in ln]
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.slow
def test_onnx_metadata_carries_the_channel_names(tmp_path, capsys):
    pytest.importorskip("onnx")
    man = _experiment(tmp_path)
    cfg = write_config(tmp_path / "cfg.yaml", man, data={"channels": ["time", "virus"]}, training={"epochs": 1})
    assert main(["train", "--config", str(cfg)]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--format", "onnx",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["cellmtl.channel_names"]) == ["time", "virus"]
    assert json.loads(meta["cellmtl.channels"]) == [0, 1]


def ome_stack(path: Path, order: list[str], names: list[str] | None = None) -> Path:
    """An OME-TIFF whose channel k holds stain order[k]; its OME metadata names them `names` (default: order)."""
    arr = np.zeros((2, len(order), 8, 8), np.uint16)
    for c, name in enumerate(order):
        arr[:, c] = LEVEL[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr, ome=True, metadata={"axes": "TCYX", "Channel": {"Name": names or order}})
    return path


def ome_levels(tmp_path: Path, files: dict[str, tuple[list[str], list[str] | None]], selection):
    rows = ["stack_id,path,condition"]
    for sid, (order, names) in files.items():
        ome_stack(tmp_path / f"{sid}.ome.tif", order, names)
        rows.append(f"{sid},{sid}.ome.tif,mock")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return matched_levels(tmp_path / "m.csv", selection)


def test_ome_channel_names_are_read_and_used_when_every_file_has_them(tmp_path):
    info = probe_records(load_manifest(manifest(tmp_path / "plain", {"a": None})))[0]
    assert info.channel_names is None  # ImageJ hyperstack: no names
    files = {"a": (["DAPI", "GFP", "RFP"], None), "b": (["GFP", "RFP", "DAPI"], None)}
    levels, names = ome_levels(tmp_path, files, [0])
    assert names == ["DAPI"] and levels == [[100.0], [100.0]]
    levels, names = ome_levels(tmp_path / "n", files, ["RFP", "GFP"])
    assert levels == [[300.0, 200.0]] * 2


def test_ome_names_that_differ_between_files_leave_indices_with_a_warning(tmp_path, caplog):
    files = {"a": (["DAPI", "GFP"], ["DAPI", "GFP"]), "b": (["DAPI", "GFP"], ["Hoechst", "GFP"])}
    levels, names = ome_levels(tmp_path, files, None)
    assert names is None and levels == [[100.0, 200.0]] * 2
    assert any("stack_id b" in r.getMessage() and "by index" in r.getMessage() for r in caplog.records)
    with pytest.raises(BadInputError) as err:
        ome_levels(tmp_path / "n", files, ["DAPI"])
    assert "stack_id b" in str(err.value) and "'DAPI' (its channels, from the files' metadata: Hoechst|GFP)" in str(
        err.value)


@pytest.mark.parametrize(
    ("xml_names", "n", "expected"),
    [(["DAPI", "GFP"], 2, ("DAPI", "GFP")), (["DAPI", ""], 2, None), (["A", "A"], 2, None), (["RGB"], 3, None)],
)
def test_ome_channel_names_need_one_distinct_name_per_channel(xml_names, n, expected):
    chans = "".join(f'<Channel ID="Channel:0:{k}" Name="{v}"/>' for k, v in enumerate(xml_names))
    xml = f'<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image><Pixels>{chans}</Pixels></Image></OME>'
    assert ome_channel_names(xml, n) == expected
    assert ome_channel_names("<not xml", n) is None


@pytest.mark.slow
def test_a_run_keeps_its_channels_when_the_manifest_rows_are_re_sorted(tmp_path, capsys):
    """Indices count from the first training stack: evaluate, resume and predict must not re-resolve them
    against whatever stack comes first today."""
    man = _experiment(tmp_path)
    for channels, name in ((["virus", "time"], "named"), ([1], "indexed")):
        (tmp_path / name).mkdir()
        cfg = write_config(tmp_path / name / "cfg.yaml", man, data={"channels": channels}, training={"epochs": 1})
        assert main(["train", "--config", str(cfg)]) == 0
        run = Path(capsys.readouterr().out.strip().splitlines()[-1])
        assert main(["evaluate", "--run", str(run)]) == 0
        before = _predictions(run / "predictions_val.csv")

        lines = man.read_text().splitlines()
        s2 = next(ln for ln in lines if ln.startswith("s2,"))  # virus|time: its indices are the other way round
        original = man.read_text()
        man.write_text("\n".join([lines[0], s2] + [ln for ln in lines[1:] if ln != s2]) + "\n")
        try:
            assert main(["evaluate", "--run", str(run)]) == 0
            assert _predictions(run / "predictions_val.csv") == before, name
            ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
            assert main(["train", "--resume", str(run), "--set", "training.epochs=2"]) == 0
            resumed = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
            assert (resumed["channels"], resumed["channel_names"]) == (ckpt["channels"], ckpt["channel_names"])
        finally:
            man.write_text(original)
        capsys.readouterr()
