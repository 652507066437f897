"""Where in a field the infection is: per-tile maps of a stack (TIFF) and their montage (PNG), and the plate
view of a plate's wells.

Map TIFF: float32, axes T C Y X, C = (`prob_infected`, `time_hours`), one pixel per tile (one pixel per frame
without tiles), ImageJ-readable with the channel names as labels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tifffile
from matplotlib import colormaps

from cellmtl.fileio import atomic_write
from cellmtl.reports.images import composite
from cellmtl.reports.plots import TITLE_SIZE, new_figure, save_figure, save_laid_out

MAP_CHANNELS = ("prob_infected", "time_hours")
MONTAGE_FRAMES = 6  # frames shown per stack: evenly spaced over its time course
PROB_CMAP = "magma"
ONSET_CMAP = "viridis"


def write_map_tiff(maps: Sequence[np.ndarray], path: Path) -> Path:
    """Frame maps `[2, rows, cols]` (in frame order) -> one TCYX float32 TIFF."""
    arr = np.stack([np.asarray(m, dtype=np.float32) for m in maps])
    meta = {"axes": "TCYX", "Labels": list(MAP_CHANNELS) * arr.shape[0]}
    return atomic_write(path, lambda fh: tifffile.imwrite(fh, arr, imagej=True, metadata=meta))


def plot_map_montage(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], hours: Sequence[float],
                     title: str, path: Path) -> Path:
    """A row of frames: each frame's image (its channels as colours) with its `prob_infected` map over it,
    the frame's hour above it, and one colour bar for the probability."""
    n = len(images)
    fig = new_figure(2.4 * n + 1.0, 2.8)
    axes = [fig.add_subplot(1, n, k + 1) for k in range(n)]
    shown = None
    for ax, img, m, h in zip(axes, images, maps, hours, strict=True):
        rgb = composite(img)
        ax.imshow(rgb, interpolation="nearest")
        shown = ax.imshow(m[0], cmap=PROB_CMAP, vmin=0.0, vmax=1.0, alpha=0.45, interpolation="nearest",
                          extent=(-0.5, rgb.shape[1] - 0.5, rgb.shape[0] - 0.5, -0.5))
        ax.set_title(f"{h:g} h", fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=TITLE_SIZE)
    fig.subplots_adjust(left=0.01, right=0.9, top=0.8, bottom=0.04, wspace=0.06)
    if shown is not None:
        bar = fig.colorbar(shown, cax=fig.add_axes((0.92, 0.1, 0.012, 0.66)))
        bar.set_label("prob_infected per tile", fontsize=9)
    return save_laid_out(fig, path, dpi=100)


def montage_frames(n_frames: int, k: int = MONTAGE_FRAMES) -> list[int]:
    """Positions of up to `k` frames evenly spaced from the first to the last."""
    return sorted({int(round(i)) for i in np.linspace(0, n_frames - 1, min(k, n_frames))})


_WELL = re.compile(r"([A-Za-z]{1,2})0*(\d{1,3})$")


def well_position(well: str) -> tuple[int, int] | None:
    """`B3` -> (1, 2): zero-based (row, column); None for what is not a well name."""
    m = _WELL.match(well.strip())
    if m is None:
        return None
    letters = m.group(1).upper()
    row = 0
    for ch in letters:
        row = row * 26 + (ord(ch) - ord("A") + 1)
    return row - 1, int(m.group(2)) - 1


def plate_layout(wells: Sequence[str]) -> tuple[int, int]:
    """(rows, cols) of the plate the wells fit: 96 (8 x 12), 384 (16 x 24) or 1536 (32 x 48)."""
    pos = [p for p in (well_position(w) for w in wells) if p is not None]
    for rows, cols in ((8, 12), (16, 24), (32, 48)):
        if all(r < rows and c < cols for r, c in pos):
            return rows, cols
    return max(r for r, _ in pos) + 1, max(c for _, c in pos) + 1


def _row_name(r: int) -> str:
    out, n = "", r + 1
    while n > 0:
        n, rem = divmod(n - 1, 26)
        out = chr(ord("A") + rem) + out
    return out


def _value_range(grid: np.ndarray) -> tuple[float, float]:
    finite = grid[np.isfinite(grid)]
    if not finite.size:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return lo, hi if hi > lo else lo + 1.0


def plot_plate(wells: Sequence[Mapping], path: Path, title: str = "") -> Path:
    """The plate seen from above, twice: wells coloured by mean `prob_infected`, and by median
    `est_onset_hour` (wells called uninfected, or without an onset, left grey); wells not imaged are blank."""
    rows, cols = plate_layout([w["well"] for w in wells])
    grids = {key: np.full((rows, cols), np.nan) for key in ("prob_infected", "est_onset_hour")}
    imaged = np.zeros((rows, cols), bool)
    for w in wells:
        pos = well_position(str(w["well"]))
        if pos is None:
            continue
        imaged[pos] = True
        for key, grid in grids.items():
            if w.get(key) is not None:
                grid[pos] = float(w[key])
    fig = new_figure(max(6.0, cols * 0.42) * 2 + 1.0, max(3.0, rows * 0.42) + 1.2)
    specs = (("prob_infected", "Mean prob_infected per well", PROB_CMAP, (0.0, 1.0)),
             ("est_onset_hour", "Estimated onset (h) per well", ONSET_CMAP, None))
    for k, (key, name, cmap, limits) in enumerate(specs):
        ax = fig.add_subplot(1, 2, k + 1)
        grid = np.ma.masked_invalid(grids[key])
        cm = colormaps[cmap].with_extremes(bad="#dddddd")
        lo, hi = limits or _value_range(grids[key])
        shown = ax.imshow(grid, cmap=cm, vmin=lo, vmax=hi, interpolation="nearest")
        ax.imshow(np.where(imaged, np.nan, 1.0), cmap="Greys", vmin=0, vmax=1, alpha=0.15, interpolation="nearest")
        ax.set_xticks(range(cols), [str(c + 1) for c in range(cols)], fontsize=7)
        ax.set_yticks(range(rows), [_row_name(r) for r in range(rows)], fontsize=7)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("light grey: no value (no onset for wells called uninfected); dark grey: not imaged",
                      fontsize=7)
        fig.colorbar(shown, ax=ax, fraction=0.03, pad=0.02)
    if title:
        fig.suptitle(f"Plate view: {title}", fontsize=TITLE_SIZE)
    return save_figure(fig, path)
