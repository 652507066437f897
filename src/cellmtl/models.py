"""Shared-backbone multi-task networks.

`MultiTaskResNet` = a torchvision ResNet trunk (first conv adapted to C input channels) + a
classification head (one logit) + a time head (one value on the scaled time axis). `forward` returns a
dict keyed by task; losses live in `cellmtl.losses`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from cellmtl.errors import BadInputError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
           "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network from a checkpoint (primitives only)."""

    name: str
    in_chans: int
    mode: str  # multitask | classification | regression
    dropout: float = 0.2
    head_hidden: int = 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adapt_conv_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB conv weight `[O, 3, k, k]` -> `[O, in_chans, k, k]`, as timm's `adapt_input_conv`: sum for one
    channel; otherwise repeat the RGB filters and rescale by 3/C so activations keep their magnitude."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / 3)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (3.0 / in_chans)


def pretrained_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, from the torch hub cache, downloaded there once if missing."""
    weights = tvm.get_model_weights(name).DEFAULT
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - any download/IO failure gets the same actionable message
        raise BadInputError(
            f"model.pretrained: could not load ImageNet weights for {name} ({exc.__class__.__name__}); "
            f"offline, download {weights.url} and put it at {cached}, or set model.pretrained: false"
        ) from None


def make_head(in_features: int, hidden: int, dropout: float, out_features: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, out_features)
    )


class MultiTaskResNet(nn.Module):
    """`forward(x [B, C, H, W] float32)` -> `{"infected": logit [B], "time": scaled time [B]}` (only the
    heads of the task mode). `time_hours` maps the scaled output back to hours with buffers stored in the
    state dict, so a checkpoint alone gives hours."""

    def __init__(self, spec: ModelSpec, *, pretrained: bool = False) -> None:
        super().__init__()
        if spec.name not in RESNETS:
            raise BadInputError(f"model.name {spec.name!r} is not supported; choose one of {', '.join(RESNETS)}")
        self.spec = spec
        trunk = tvm.get_model(spec.name, weights=None)
        if pretrained:
            trunk.load_state_dict(pretrained_state_dict(spec.name))
        old = trunk.conv1
        conv = nn.Conv2d(spec.in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        if pretrained:
            with torch.no_grad():
                conv.weight.copy_(adapt_conv_weight(old.weight, spec.in_chans))
        trunk.conv1 = conv
        n_features = trunk.fc.in_features
        trunk.fc = nn.Identity()
        self.backbone = trunk
        self.cls_head = make_head(n_features, spec.head_hidden, spec.dropout) if spec.mode != "regression" else None
        self.time_head = (
            make_head(n_features, spec.head_hidden, spec.dropout) if spec.mode != "classification" else None
        )
        self.register_buffer("time_shift", torch.zeros(()))
        self.register_buffer("time_scale", torch.ones(()))

    def set_time_scaling(self, shift: float, scale: float) -> None:
        self.time_shift.fill_(shift)
        self.time_scale.fill_(scale)

    def time_hours(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled * self.time_scale + self.time_shift

    def scale_time(self, hours: torch.Tensor) -> torch.Tensor:
        return (hours - self.time_shift) / self.time_scale

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        out: dict[str, torch.Tensor] = {}
        if self.cls_head is not None:
            out["infected"] = self.cls_head(feats).squeeze(-1)
        if self.time_head is not None:
            out["time"] = self.time_head(feats).squeeze(-1)
        return out


def build_model(spec: ModelSpec, *, pretrained: bool = False) -> MultiTaskResNet:
    return MultiTaskResNet(spec, pretrained=pretrained)
