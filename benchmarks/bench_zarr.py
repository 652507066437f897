#!/usr/bin/env python
"""OME-Zarr reading keeps memory flat: peak RSS while reading every frame of a large field, against its size.

    python benchmarks/bench_zarr.py [--gb 2.1] [--side 8192] [--out DIR] [--checkpoint CKPT]

Writes one NGFF 0.4 image (T x 2 channels x side x side uint16, chunks of 1 x 1 x 1 x 1024 x 1024, T chosen
so the array holds at least --gb GB), then, each in a fresh subprocess:
1. reads every frame through `cellmtl.data.readers.StackReader` (what training and predict do) and reports peak RSS;
2. with --checkpoint, runs `cellmtl predict` on it under `/usr/bin/time -v`-like accounting (ru_maxrss).
Prints one line per measurement and, last, `array_gb=<size> read_peak_rss_gb=<peak> ratio=<peak/size>`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_field(path: Path, frames: int, side: int) -> float:
    """A TCZYX uint16 NGFF 0.4 image, written chunk-row by chunk-row (never whole in memory); its size in GB."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    arr = group.create_array("0", shape=(frames, 2, 1, side, side), chunks=(1, 1, 1, 1024, 1024), dtype="uint16")
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 4000, (1024, side), dtype=np.uint16)
    for t in range(frames):
        for c in range(2):
            for y in range(0, side, 1024):
                arr[t, c, 0, y:y + 1024] = tile + np.uint16(t * 10 + c)
    axes = [{"name": "t", "type": "time", "unit": "hour"}, {"name": "c", "type": "channel"},
            {"name": "z", "type": "space"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.5, 1, 1, 1, 1]}]}]}]
    group.attrs["omero"] = {"channels": [{"label": "A"}, {"label": "B"}]}
    return frames * 2 * side * side * 2 / 1e9


def read_all(path: str) -> dict:
    """(subprocess) read every frame and channel as the Dataset does; peak RSS in GB."""
    from cellmtl.data.readers import StackReader, probe_stack

    info = probe_stack(path)
    t0 = time.perf_counter()
    with StackReader(info) as reader:
        checksum = sum(float(reader.read(t)[:, ::512, ::512].sum()) for t in range(info.n_frames))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB
    return {"frames": info.n_frames, "seconds": time.perf_counter() - t0, "peak_rss_gb": peak, "checksum": checksum}


def subprocess_json(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def predict_peak(image: Path, checkpoint: str, out: Path) -> dict:
    code = ("import json,resource,sys,time; from cellmtl.cli import main; t=time.perf_counter(); "
            f"rc=main(['predict','--checkpoint',{checkpoint!r},{str(image)!r},'--out',{str(out)!r}]); "
            "print(json.dumps({'rc': rc, 'seconds': time.perf_counter()-t, "
            "'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1e6}))")
    return subprocess_json(["-c", code])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.1, help="at least this many GB of pixels")
    ap.add_argument("--side", type=int, default=8192, help="field side in pixels (a multiple of 1024)")
    ap.add_argument("--out", type=Path, help="where to write the image (default: a temporary folder)")
    ap.add_argument("--checkpoint", help="also run cellmtl predict on the image with this 2-channel checkpoint")
    ap.add_argument("--_read", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._read:
        print(json.dumps(read_all(args._read)))
        return
    frames = max(1, int(np.ceil(args.gb * 1e9 / (2 * args.side * args.side * 2))))
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        image = Path(tmp) / "field.ome.zarr"
        t0 = time.perf_counter()
        size_gb = write_field(image, frames, args.side)
        print(f"wrote {image}: {frames} x 2 x {args.side} x {args.side} uint16 = {size_gb:.2f} GB of pixels "
              f"in {time.perf_counter() - t0:.0f} s")
        read = subprocess_json([__file__, "--_read", str(image)])
        frame_gb = 2 * args.side * args.side * 4 / 1e9
        print(f"read every frame: {read['frames']} frames in {read['seconds']:.1f} s, peak RSS "
              f"{read['peak_rss_gb']:.2f} GB (one frame as float32: {frame_gb:.2f} GB)")
        if args.checkpoint:
            pred = predict_peak(image, args.checkpoint, Path(tmp) / "pred.csv")
            print(f"cellmtl predict: rc {pred['rc']}, {pred['seconds']:.1f} s, peak RSS {pred['peak_rss_gb']:.2f} GB")
    peak = read["peak_rss_gb"]
    print(f"array_gb={size_gb:.2f} read_peak_rss_gb={peak:.2f} ratio={peak / size_gb:.2f}")


if __name__ == "__main__":
    main()
