"""Whole fields at native resolution, as tiles: the grid, the training draw, and how tiles make a frame.

A frame is first block-averaged by `data.downsample` (an integer), then cut into `data.tile_size` squares:
validation, evaluate, predict, cv, compare and explain use every tile on a fixed grid that covers the frame
(neighbours overlap by `data.tile_overlap` of a side; the last row and column are moved in so they end at
the edge), training draws random tiles. Pure functions of numbers and tensors, tested by hand.

How a frame's outputs are made from its tiles (`aggregate`):
- `prob_infected`: the mean of the tiles' probabilities. A frame is infected or not as a whole (its well is);
  the mean keeps one odd tile (debris, an empty corner) from deciding, and stays a probability.
- `pred_time_hours`: the median of the tiles' times: robust to tiles with nothing to read the clock from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cellmtl.config import DataConfig

BACKGROUND_DRAWS = 4  # training: random positions tried per tile; the most structured one is kept


@dataclass(frozen=True)
class TileSpec:
    """`size`: tile side in pixels after `downsample`; `overlap`: fraction of a side shared by neighbours;
    `per_frame`: random tiles drawn per training frame and epoch."""

    size: int
    overlap: float = 0.0
    downsample: int = 1
    per_frame: int = 4


def tile_spec(d: DataConfig) -> TileSpec | None:
    """The tiles a config asks for (None: whole frames resized to data.image_size)."""
    if d.tile_size is None:
        return None
    return TileSpec(d.tile_size, d.tile_overlap, d.downsample, d.tiles_per_frame)


def grid_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile origins along one axis of `length` pixels: steps of `tile * (1 - overlap)`, the last moved in to
    end at the edge; one tile at 0 when the axis is shorter than a tile (the tile is then padded)."""
    if length <= tile:
        return [0]
    stride = max(1, int(round(tile * (1.0 - overlap))))
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def tile_grid(height: int, width: int, spec: TileSpec) -> tuple[list[int], list[int]]:
    """(row origins, column origins) of the grid over a frame of `height` x `width` (after downsampling)."""
    return grid_starts(height, spec.size, spec.overlap), grid_starts(width, spec.size, spec.overlap)


def grid_shape(height: int, width: int, spec: TileSpec) -> tuple[int, int]:
    """(rows, cols) of tiles for a frame of native `height` x `width` pixels."""
    ys, xs = tile_grid(height // spec.downsample, width // spec.downsample, spec)
    return len(ys), len(xs)


def downsample(img: torch.Tensor, factor: int) -> torch.Tensor:
    """`[C, H, W]` -> `[C, H // factor, W // factor]`, each pixel the mean of a `factor` x `factor` block (the
    few rows and columns that do not fill a block are dropped)."""
    if factor == 1:
        return img
    c, h, w = img.shape
    hh, ww = h // factor, w // factor
    return img[:, : hh * factor, : ww * factor].reshape(c, hh, factor, ww, factor).mean(dim=(2, 4))


def crop(field: torch.Tensor, y: int, x: int, size: int) -> torch.Tensor:
    """The `size` square at (y, x) of a `[C, H, W]` field, zero-padded at the bottom and right where the field
    is smaller (zero is the normalised background)."""
    tile = field[:, y : y + size, x : x + size]
    if tile.shape[1] == size and tile.shape[2] == size:
        return tile
    return F.pad(tile, (0, size - tile.shape[2], 0, size - tile.shape[1]))


def grid_tiles(field: torch.Tensor, spec: TileSpec) -> tuple[torch.Tensor, tuple[int, int]]:
    """Every tile of the grid, row by row: `[K, C, size, size]` and the grid's (rows, cols)."""
    ys, xs = tile_grid(field.shape[1], field.shape[2], spec)
    tiles = torch.stack([crop(field, y, x, spec.size) for y in ys for x in xs])
    return tiles, (len(ys), len(xs))


def random_tile(field: torch.Tensor, spec: TileSpec, gen: torch.Generator) -> torch.Tensor:
    """A training tile at a random position. Of BACKGROUND_DRAWS positions the one with the largest intensity
    spread (std over its pixels and channels) is kept, so empty background, which carries neither infection
    nor time, is rarely trained on; the draw is reproducible from `gen`."""
    h, w = field.shape[1], field.shape[2]
    best, best_std = None, -math.inf
    for _ in range(BACKGROUND_DRAWS):
        y = int(torch.randint(0, max(h - spec.size, 0) + 1, (1,), generator=gen))
        x = int(torch.randint(0, max(w - spec.size, 0) + 1, (1,), generator=gen))
        tile = crop(field, y, x, spec.size)
        std = float(tile.std())
        if std > best_std:
            best, best_std = tile, std
    assert best is not None
    return best


def aggregate(prob: np.ndarray | None, time: np.ndarray | None) -> tuple[float | None, float | None]:
    """A frame's (prob_infected, time) from its tiles' (see the module docstring for why mean and median)."""
    return (None if prob is None else float(np.mean(prob)), None if time is None else float(np.median(time)))
