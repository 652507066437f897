"""Microscopy images as a person sees them: channels as colours, each stretched to its own range."""

from __future__ import annotations

import numpy as np
import torch

# One colour per channel for composites (magenta/green/cyan... keep channel 0 readable alone in grey).
CHANNEL_COLORS = np.array(
    [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.5, 0.0], [0.5, 0.5, 1.0]]
)

def composite(img: torch.Tensor | np.ndarray) -> np.ndarray:
    """`[C, H, W]` (any range) -> `[H, W, 3]` float in [0, 1]: one channel in grey, several as additive
    colours, each channel stretched between its 1st and 99.5th percentile."""
    a = np.asarray(img, dtype=np.float32)
    lo = np.percentile(a, 1.0, axis=(1, 2), keepdims=True)
    hi = np.percentile(a, 99.5, axis=(1, 2), keepdims=True)
    a = np.clip((a - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)
    if a.shape[0] == 1:
        return np.repeat(a[0][..., None], 3, axis=2)
    colors = CHANNEL_COLORS[np.arange(a.shape[0]) % len(CHANNEL_COLORS)]
    rgb = np.einsum("chw,ck->hwk", a, colors)
    return np.clip(rgb, 0.0, 1.0)
