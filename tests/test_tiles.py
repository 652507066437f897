"""Tiles at native resolution: the grid and the aggregation by hand, then a tile model end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cellmtl.cli import main
from cellmtl.data.tiles import TileSpec, aggregate, crop, downsample, grid_starts, grid_tiles, random_tile
from cellmtl.engine import frame_from_tiles
from cellmtl.reports.maps import plate_layout, well_position
from tests.conftest import tiny_stack, write_config


def test_grid_starts_cover_the_axis_and_end_at_the_edge():
    assert grid_starts(144, 64, 0.0) == [0, 64, 80]
    assert grid_starts(112, 64, 0.0) == [0, 48]
    assert grid_starts(128, 64, 0.5) == [0, 32, 64]
    assert grid_starts(40, 64, 0.0) == [0]  # shorter than a tile: one, padded
    assert grid_starts(2048, 64, 0.0) == list(range(0, 2048, 64))


def test_downsample_is_a_block_mean_and_crop_pads_with_zero():
    img = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)
    small = downsample(img, 2)
    assert small.shape == (2, 2, 3) and small[0, 0, 0] == (0 + 1 + 6 + 7) / 4
    tile = crop(torch.ones(1, 5, 5), 2, 2, 4)
    assert tile.shape == (1, 4, 4) and tile.sum() == 9  # 3 x 3 of the field, the rest zero padding


def test_grid_tiles_row_by_row_and_random_tiles_prefer_structure():
    field = torch.zeros(1, 112, 144)
    field[0, 60:100, 90:130] = torch.rand(40, 40)  # structure in one corner, the rest empty background
    tiles, grid = grid_tiles(field, TileSpec(64))
    assert grid == (2, 3) and tiles.shape == (6, 1, 64, 64)
    assert torch.equal(tiles[5], field[:, 48:112, 80:144])
    gen = torch.Generator().manual_seed(0)
    picks = [random_tile(field, TileSpec(64), gen) for _ in range(20)]
    assert np.mean([float(t.std() > 0) for t in picks]) > 0.9  # background tiles are rarely drawn


def test_aggregation_by_hand():
    assert aggregate(np.array([0.9, 0.8, 0.1]), np.array([5.0, 6.0, 40.0])) == pytest.approx((0.6, 6.0))
    out = frame_from_tiles({"infected": torch.logit(torch.tensor([0.9, 0.8, 0.1])),
                            "time": torch.tensor([5.0, 6.0, 40.0])})
    assert float(torch.sigmoid(out["infected"])[0]) == pytest.approx(0.6, abs=1e-5)
    assert float(out["time"][0]) == 6.0


def test_plate_layouts_from_well_names():
    assert well_position("B03") == (1, 2) and well_position("AA1") == (26, 0) and well_position("x") is None
    assert plate_layout(["A1", "H12"]) == (8, 12)
    assert plate_layout(["A1", "P24"]) == (16, 24)


def _fields(root: Path) -> Path:
    """8 stacks of 6 frames, 2 channels, 112 x 144 px; a `well` column."""
    rng = np.random.default_rng(0)
    rows = ["stack_id,path,condition,infection_onset_hour,group,well"]
    for k in range(8):
        infected = k % 2 == 0
        arr = np.concatenate([tiny_stack(rng, 6, size=144, infected=infected)] * 1)[:, :, :112, :]
        tifffile.imwrite(root / f"s{k}.tif", arr, imagej=True, metadata={"axes": "TCYX"})
        rows.append(f"s{k},s{k}.tif,{'infected' if infected else 'mock'},{'1' if infected else ''},g{k // 2},"
                    f"{'BC'[k % 2]}{k // 2 + 2}")
    (root / "m.csv").write_text("\n".join(rows) + "\n")
    return root / "m.csv"


@pytest.mark.slow
def test_a_tile_model_end_to_end(capsys, tmp_path):
    manifest = _fields(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", manifest, data={"tile_size": 64, "tiles_per_frame": 2},
                       training={"epochs": 1})
    assert main(["train", "--config", str(cfg)]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["config"]["data"]["tile_size"] == 64 and "tiles" not in ckpt  # stored once, in the config
    with (run / "predictions_val.csv").open() as fh:
        val = list(csv.DictReader(fh))
    assert len(val) == 5 + 6  # one row per frame, not per tile (the infected stack drops its pre-onset frame)

    assert main(["evaluate", "--run", str(run)]) == 0
    capsys.readouterr()
    report = (run / "report.html").read_text()  # the evaluation's tile maps and plate view are in the report
    assert "Plate view" in report and "Tile map: s0" in report
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--manifest", str(manifest),
                 "--out", str(out), "--maps", str(tmp_path / "maps")]) == 0
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 48 and all(0.0 <= float(r["prob_infected"]) <= 1.0 for r in rows)
    maps = tifffile.imread(tmp_path / "maps" / "s0.tif")
    assert maps.shape == (6, 2, 2, 3) and maps.dtype == np.float32  # T x (prob, time) x 2 x 3 tiles
    assert (tmp_path / "maps" / "s0.png").is_file()
    # the frame's prob_infected is the mean of its tiles'
    assert float(rows[0]["prob_infected"]) == pytest.approx(float(maps[0, 0].mean()), abs=1e-4)
    with (tmp_path / "p.wells.csv").open() as fh:
        wells = list(csv.DictReader(fh))
    assert len(wells) == 8 and {w["well"] for w in wells} == {"B2", "C2", "B3", "C3", "B4", "C4", "B5", "C5"}
    assert (tmp_path / "p.plate.png").is_file()

    assert main(["export", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--format", "onnx", "--out",
                 str(tmp_path / "m.onnx")]) == 0
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:] == [2, 64, 64]
    assert main(["explain", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--manifest", str(manifest),
                 "--out", str(tmp_path / "ex")]) == 0
    assert len(list((tmp_path / "ex").glob("s*.png"))) == 8 and (tmp_path / "ex" / "plate.png").is_file()
    assert len(list((tmp_path / "ex" / "maps").glob("*.png"))) == 8  # the tile map of every stack
    page = (tmp_path / "ex" / "index.html").read_text()
    assert "src='maps/s0.png'" in page and "src='plate.png'" in page


@pytest.mark.slow
def test_cv_with_tiles(capsys, tmp_path):
    manifest = _fields(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", manifest, data={"tile_size": 64, "tiles_per_frame": 1},
                       training={"epochs": 1})
    assert main(["cv", "--config", str(cfg), "--folds", "2"]) == 0
    cv_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    with (cv_dir / "predictions_oof.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 48 - 4  # every frame once, out of fold (4 pre-onset frames dropped)


def test_tile_options_need_tiles_and_finetune(capsys, tmp_path):
    manifest = _fields(tmp_path)
    for data, training in (({"downsample": 2}, {}), ({"tile_size": 64}, {"strategy": "probe"})):
        cfg = write_config(tmp_path / "c.yaml", manifest, data=data, training=training)
        assert main(["check-data", "--config", str(cfg)]) == 2
        assert "tile" in capsys.readouterr().err
