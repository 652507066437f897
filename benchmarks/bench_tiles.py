#!/usr/bin/env python
"""Whole fields at native resolution: tile throughput, and a tile model on 2048 x 2048 px fields.

    python benchmarks/bench_tiles.py [--out DIR] [--skip-throughput] [--skip-fields]

1. Throughput: tiles per second of `cellmtl.engine.run_model` on CPU over a 2048 x 2048 px, 2-channel field for
   resnet18 at 64 and 128 px tiles (an untrained network: speed does not depend on the weights), after a warm-up.
2. Big fields: a tile model (resnet18, 64 px tiles) trained on small 112 x 144 px fields of the hold-out
   generator (`holdout_experiment.py`, course cascade, 12 stacks), then two 2048 x 2048 px, 2-channel stacks of
   20 frames, each a mosaic of that generator's small fields (one infected, one mock well, wells B2 and C2),
   scored by `cellmtl predict --maps` under `/usr/bin/time -v`: the conditions called, the map shape, wells.csv
   and the peak RSS.
Prints one line per measurement and, last, a summary line.
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from holdout_experiment import write as write_holdout  # noqa: E402

from cellmtl.data.dataset import SampleIndex, TimeCourseDataset  # noqa: E402
from cellmtl.data.readers import probe_stack  # noqa: E402
from cellmtl.data.tiles import TileSpec  # noqa: E402
from cellmtl.data.transforms import Normalizer  # noqa: E402
from cellmtl.engine import run_model  # noqa: E402
from cellmtl.models import ModelSpec, MultiTaskNet  # noqa: E402
from cellmtl.runtime import make_loader  # noqa: E402

CELLMTL = [sys.executable, "-m", "cellmtl"]


def throughput(root: Path, tile: int, frames: int = 2) -> float:
    """Tiles/s of run_model over `frames` 2048 x 2048 frames (the second pass; the first warms up)."""
    path = root / "field.tif"
    if not path.exists():
        rng = np.random.default_rng(0)
        tifffile.imwrite(path, rng.integers(0, 4000, (frames, 2, 2048, 2048), dtype=np.uint16), imagej=True,
                         metadata={"axes": "TCYX"})
    info = probe_stack(path)
    index = SampleIndex(np.zeros(frames, np.int32), np.arange(frames, dtype=np.int32), np.zeros(frames, np.float32),
                        np.full(frames, -1, np.int8), np.full(frames, np.nan, np.float32))
    ds = TimeCourseDataset([info], ["field"], index, channels=[0, 1], image_size=tile,
                           normalizer=Normalizer("per_image", (1.0, 99.8)), tiles=TileSpec(tile))
    model = MultiTaskNet(ModelSpec("resnet18", 2, "multitask", head_hidden=256)).eval()
    loader = make_loader(ds, batch_size=64, num_workers=0, device=torch.device("cpu"))
    run_model(model, loader, torch.device("cpu"), tile_batch=64)
    t0 = time.perf_counter()
    preds = run_model(model, loader, torch.device("cpu"), tile_batch=64)
    n_tiles = frames * (2048 // tile) ** 2
    assert preds.n == frames
    return n_tiles / (time.perf_counter() - t0)


def mosaic_stacks(small: Path, out: Path, frames: int = 20, side: int = 2048) -> Path:
    """Two big stacks, each a mosaic of one condition's small fields (every tile a small field's frame at the
    same time point, the fields cycled); a manifest with wells and conditions."""
    rows = list(csv.DictReader((small / "manifest.csv").open()))
    out.mkdir(parents=True, exist_ok=True)
    lines = ["stack_id,path,condition,infection_onset_hour,well"]
    for well, cond in (("B2", "infected"), ("C2", "uninfected")):
        chosen = [r for r in rows if r["condition"] == cond][:4]
        sources = [tifffile.imread(small / r["path"]) for r in chosen]
        onset = chosen[0]["infection_onset_hour"] if cond == "infected" else ""
        h, w = sources[0].shape[-2:]
        big = np.zeros((frames, 2, side, side), np.uint16)
        k = 0
        for y in range(0, side, h):
            for x in range(0, side, w):
                src = sources[k % len(sources)]
                k += 1
                patch = src[: frames, :, : min(h, side - y), : min(w, side - x)]
                big[: patch.shape[0], :, y:y + patch.shape[2], x:x + patch.shape[3]] = patch
        name = f"big_{well}.tif"
        tifffile.imwrite(out / name, big, imagej=True, metadata={"axes": "TCYX", "finterval": 3600})
        lines.append(f"{well},{name},{cond},{onset},{well}")
    (out / "manifest.csv").write_text("\n".join(lines) + "\n")
    return out / "manifest.csv"


def train_tile_model(small_manifest: Path, out: Path) -> Path:
    cfg = out / "tiles.yaml"
    cfg.write_text(f"""experiment_name: tiles
output_dir: {out / 'runs'}
seed: 0
data:
  manifest: {small_manifest}
  tile_size: 64
  tiles_per_frame: 4
  num_workers: 0
training:
  epochs: 8
  progress: false
""")
    done = subprocess.run([*CELLMTL, "train", "--config", str(cfg)], capture_output=True, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def peak_rss_gb(time_v: str) -> float:
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_v)
    return float(found.group(1)) / 1e6 if found else float("nan")


def big_fields(out: Path) -> dict:
    small = out / "small"
    write_holdout(small, seed=0, stacks=12, frames=20, height=112, width=144, val=4, course="cascade")
    run = train_tile_model(small / "manifest.csv", out)
    res = (run / "results.json").read_text()
    print(f"tile model trained on 112 x 144 fields: {run} ({re.search(r'.cls_auc.: ([0-9.]+)', res).group(0)})")
    manifest = mosaic_stacks(small, out / "big")
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *CELLMTL, "predict", "--checkpoint", str(run / "checkpoints" /
                           "best.pt"), "--manifest", str(manifest), "--out", str(out / "pred.csv"), "--maps",
                           str(out / "maps")], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"predict failed: {done.stderr[-2000:]}")
    stacks = {r["stack_id"]: r for r in csv.DictReader((out / "pred.stacks.csv").open())}
    wells = list(csv.DictReader((out / "pred.wells.csv").open()))
    maps = {sid: tifffile.imread(out / "maps" / f"{sid}.tif").shape for sid in stacks}
    right = all(r["pred_condition"] == r["condition"] for r in stacks.values())
    return {"right": right, "calls": {k: (v["pred_condition"], float(v["prob_infected"])) for k, v in stacks.items()},
            "maps": maps, "wells": len(wells), "peak_rss_gb": peak_rss_gb(done.stderr), "wall_s": wall,
            "tiles": sum(s[0] * s[2] * s[3] for s in maps.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="work folder (default: a temporary one)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-fields", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        root = Path(tmp)
        speeds = {}
        if not args.skip_throughput:
            for tile in (64, 128):
                speeds[tile] = throughput(root, tile)
                print(f"predict throughput, resnet18, {tile} px tiles, CPU ({torch.get_num_threads()} threads): "
                      f"{speeds[tile]:.0f} tiles/s = {speeds[tile] * tile * tile / 1e6:.2f} Mpx/s")
        fields = {}
        if not args.skip_fields:
            fields = big_fields(root)
            print(f"2048 x 2048 fields: calls {fields['calls']} -> {'both right' if fields['right'] else 'WRONG'}; "
                  f"maps {fields['maps']}; wells.csv rows {fields['wells']}; peak RSS {fields['peak_rss_gb']:.2f} GB; "
                  f"{fields['tiles']} tiles in {fields['wall_s']:.0f} s (start-up included)")
    print("tiles_per_s=" + ",".join(f"{t}px:{v:.0f}" for t, v in speeds.items())
          + (f" big_fields_right={fields['right']} peak_rss_gb={fields['peak_rss_gb']:.2f}" if fields else ""))


if __name__ == "__main__":
    main()
