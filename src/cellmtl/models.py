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

from cellmtl.config import Config
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
    time_head: str = "shared"  # shared | per_class | conditioned (defaults keep older checkpoints loading)
    time_nll: bool = False  # gaussian_nll: the time head also predicts a log-variance

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


TIME_HEADS = ("shared", "per_class", "conditioned")


class MultiTaskResNet(nn.Module):
    """`forward(x [B, C, H, W] float32)` -> `{"infected": logit [B], "time": scaled time [B]}` (only the
    heads of the task mode). `time_hours` maps the scaled output back to hours with buffers stored in the
    state dict, so a checkpoint alone gives hours.

    Time head variants (`spec.time_head`): `shared`, one output; `per_class`, one output per class
    (`time_per_class` [B, 2], column 0 uninfected, 1 infected) of which `time` is the predicted class's,
    so inference needs no label; `conditioned`, the head also sees the classification logit, detached so
    the time loss cannot bend the classifier towards what helps regression. With `spec.time_nll` the head
    also gives `time_logvar` [B] (log-variance on the scaled axis; `time_logvar_per_class` for per_class).
    """

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
        if spec.time_head not in TIME_HEADS:
            raise BadInputError(f"multitask.time_head {spec.time_head!r}: choose one of {', '.join(TIME_HEADS)}")
        if spec.time_head != "shared" and spec.mode != "multitask":
            raise BadInputError(f"multitask.time_head {spec.time_head!r} needs task.mode multitask")
        n_time = (2 if spec.time_head == "per_class" else 1) * (2 if spec.time_nll else 1)
        n_in = n_features + (1 if spec.time_head == "conditioned" else 0)
        self.time_head = (
            make_head(n_in, spec.head_hidden, spec.dropout, n_time) if spec.mode != "classification" else None
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
            out.update(self._time_outputs(feats, out.get("infected")))
        return out

    def _time_outputs(self, feats: torch.Tensor, logit: torch.Tensor | None) -> dict[str, torch.Tensor]:
        spec = self.spec
        if spec.time_head == "conditioned":
            assert logit is not None and self.time_head is not None
            feats = torch.cat([feats, logit.detach().unsqueeze(-1).to(feats.dtype)], dim=-1)
        raw = self.time_head(feats)  # [B, n_time]: means first, then log-variances
        k = 2 if spec.time_head == "per_class" else 1
        mean, logvar = raw[:, :k], (raw[:, k:] if spec.time_nll else None)
        if spec.time_head != "per_class":
            out = {"time": mean.squeeze(-1)}
            if logvar is not None:
                out["time_logvar"] = logvar.squeeze(-1)
            return out
        assert logit is not None
        pred_cls = (logit.detach() >= 0).long().unsqueeze(-1)  # the predicted class picks the output
        out = {"time_per_class": mean, "time": mean.gather(1, pred_cls).squeeze(-1)}
        if logvar is not None:
            out["time_logvar_per_class"] = logvar
            out["time_logvar"] = logvar.gather(1, pred_cls).squeeze(-1)
        return out


def spec_from_config(cfg: Config, n_channels: int) -> ModelSpec:
    """The network a config asks for, on `n_channels` image channels (times the temporal context frames)."""
    m = cfg.model
    in_chans = n_channels * len(cfg.data.temporal_context_hours or [0])
    nll = cfg.multitask.regression_loss == "gaussian_nll"
    return ModelSpec(m.name, in_chans, cfg.task.mode, m.dropout, m.head_hidden, cfg.multitask.time_head, nll)


def build_model(spec: ModelSpec, *, pretrained: bool = False) -> MultiTaskResNet:
    return MultiTaskResNet(spec, pretrained=pretrained)
