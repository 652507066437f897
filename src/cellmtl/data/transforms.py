"""Normalisation, resizing and microscopy-safe augmentation.

Images are float32 `[C, H, W]` tensors in raw intensity units until `Normalizer` maps each channel's
low/high percentile to 0/1. Geometric ops come from torchvision.transforms.v2's functional API;
intensity ops are per channel (RGB-only ops such as colour jitter do not fit fluorescence channels).
Every random op draws from a `torch.Generator` passed in, never from global state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from cellmtl.config import AugmentConfig

EPS = 1e-6


def channel_percentiles(img: np.ndarray | torch.Tensor, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (low, high) percentiles of `[C, H, W]` (or `[C, N]` pixel samples); float32 [C] each."""
    arr = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    flat = arr.reshape(arr.shape[0], -1)
    lo, hi = np.percentile(flat, [low, high], axis=1)
    return lo.astype(np.float32), hi.astype(np.float32)


@dataclass(frozen=True)
class Normalizer:
    """`dataset` mode: fixed per-channel (lo, hi) measured on training frames. `per_image` mode: each image
    scaled by its own percentiles (cellpose's normalize99 idea), `(x - lo) / (hi - lo + floor)`: `floor`
    (raw intensity units per channel, from training frames) keeps near-empty channels from being
    stretched into bright noise; None means no floor."""

    mode: str
    percentiles: tuple[float, float]
    lo: tuple[float, ...] | None = None
    hi: tuple[float, ...] | None = None
    floor: tuple[float, ...] | None = None

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.mode == "per_image":
            lo_np, hi_np = channel_percentiles(img, *self.percentiles)
            lo, hi = torch.from_numpy(lo_np), torch.from_numpy(hi_np)
            span = torch.clamp(hi - lo, min=EPS)
            if self.floor is not None:
                span = span + self._floor()
            return (img - lo[:, None, None]) / span[:, None, None]
        if self.lo is None or self.hi is None:
            raise RuntimeError("dataset normaliser used before it was fitted")
        offset, scale = self._affine()
        return (img - offset).mul_(scale)

    def _floor(self) -> torch.Tensor:
        """The per-channel floor as a cached `[C]` tensor (built once per process, not per image)."""
        cached = self.__dict__.get("_floor_t")
        if cached is None:
            cached = torch.tensor(self.floor, dtype=torch.float32)
            object.__setattr__(self, "_floor_t", cached)
        return cached

    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached `[C, 1, 1]` offset and 1/range tensors (built once per process, not per image)."""
        cached = self.__dict__.get("_cache")
        if cached is None:
            lo, hi = torch.tensor(self.lo), torch.tensor(self.hi)
            cached = (lo[:, None, None], 1.0 / torch.clamp(hi - lo, min=EPS)[:, None, None])
            object.__setattr__(self, "_cache", cached)
        return cached

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "percentiles": list(self.percentiles),
            "lo": None if self.lo is None else list(self.lo),
            "hi": None if self.hi is None else list(self.hi),
            "floor": None if self.floor is None else list(self.floor),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        lo, hi, floor = d.get("lo"), d.get("hi"), d.get("floor")  # checkpoints before the floor have none
        return cls(
            mode=str(d["mode"]),
            percentiles=(float(d["percentiles"][0]), float(d["percentiles"][1])),
            lo=None if lo is None else tuple(float(x) for x in lo),
            hi=None if hi is None else tuple(float(x) for x in hi),
            floor=None if floor is None else tuple(float(x) for x in floor),
        )


def range_floor(samples: Sequence[np.ndarray], percentiles: tuple[float, float], fraction: float) -> tuple[float, ...]:
    """Per-channel floor = `fraction` x the 90th percentile, over frames, of each frame's percentile range:
    the range of a typical bright image (robust to a few frames with hot pixels), in raw units."""
    spans = np.stack([np.subtract(*channel_percentiles(s, *percentiles)[::-1]) for s in samples])  # [F, C]
    return tuple(float(fraction * v) for v in np.percentile(spans, 90, axis=0))


def fit_normalizer(
    mode: str, percentiles: Sequence[float], samples: Sequence[np.ndarray] = (), floor_fraction: float = 0.0
) -> Normalizer:
    """`samples`: `[C, N]` float32 pixel samples, one array per training frame (`dataset` mode's
    percentiles; per_image mode's floor when `floor_fraction` > 0)."""
    pct = (float(percentiles[0]), float(percentiles[1]))
    if mode == "per_image":
        if floor_fraction > 0 and samples:
            return Normalizer(mode, pct, floor=range_floor(samples, pct, floor_fraction))
        return Normalizer(mode, pct)
    if not samples:
        raise ValueError("dataset normalisation needs pixel samples from training frames")
    lo, hi = channel_percentiles(np.concatenate(list(samples), axis=1), *pct)
    return Normalizer(mode, pct, tuple(lo.tolist()), tuple(hi.tolist()))


def resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """`[C, H, W]` -> `[C, size, size]`, bilinear with antialiasing (no aliasing of fine texture on shrink)."""
    if img.shape[-2:] == (size, size):
        return img
    return F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def augment(img: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Random flips, 90-degree rotations, per-channel gain/offset and optional noise on `[C, H, W]`."""
    if not cfg.enabled:
        return img
    u = torch.rand(3, generator=gen)
    if cfg.crop_scale < 1.0:
        h, w = img.shape[-2:]
        frac = cfg.crop_scale + (1.0 - cfg.crop_scale) * float(torch.rand(1, generator=gen))
        ch, cw = max(1, round(h * frac)), max(1, round(w * frac))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        img = F.interpolate(img[None, :, top : top + ch, left : left + cw], size=(h, w), mode="bilinear",
                            align_corners=False)[0]
    if cfg.flips and u[0] < 0.5:
        img = TF.horizontal_flip(img)
    if cfg.flips and u[1] < 0.5:
        img = TF.vertical_flip(img)
    if cfg.rot90:
        k = int(torch.randint(0, 4, (1,), generator=gen))
        img = torch.rot90(img, k, dims=(-2, -1))
    c = img.shape[0]
    if cfg.intensity_scale > 0:
        gain = 1.0 + (torch.rand(c, generator=gen) * 2 - 1) * cfg.intensity_scale
        img = img * gain[:, None, None]
    if cfg.intensity_offset > 0:
        offset = (torch.rand(c, generator=gen) * 2 - 1) * cfg.intensity_offset
        img = img + offset[:, None, None]
    if cfg.noise_std > 0:
        img = img + torch.randn(img.shape, generator=gen) * cfg.noise_std
    return img.contiguous()
