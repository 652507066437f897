"""Shared-backbone multi-task networks.

`MultiTaskNet` = a feature trunk from `cellmtl.backbones` (any torchvision classification model, or timm's; first
conv adapted to C input channels) + a classification head (one logit) + a time head (one value on the scaled time
axis). `forward` returns a dict keyed by task; losses live in `cellmtl.losses`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from cellmtl.backbones import (
    Trunk,
    WeightsFile,
    adapt_conv_weight,
    adapt_stem,
    channel_statistics,
    create_trunk,
    feature_layer,
    load_trunk_weights,
    pretrained_state_dict,
    pretrained_statistics,
    read_weights_file,
    resolve_name,
    stem_name,
    timm_trunk,
)
from cellmtl.config import Config
from cellmtl.errors import BadInputError

__all__ = ["ModelSpec", "MultiTaskNet", "adapt_conv_weight", "build_model", "spec_from_config"]

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
           "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
TIME_HEADS = ("shared", "per_class", "conditioned")
FUSIONS = ("channels", "features")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network from a checkpoint (primitives only; the defaults of the later
    fields keep older checkpoints loading).

    `in_chans`: input channels, the temporal context's frames times the image channels. `context_frames` and
    `temporal_fusion` say how the network reads them: `channels`, all at the first convolution; `features`, each
    frame through the backbone on its own, the pooled features concatenated for the heads (what an ImageNet stem,
    which expects one image, reads best). `input_mean` / `input_std`: per stem channel, applied inside `forward`
    after cellmtl's own [0, 1]-style normalisation (a pretrained stem's ImageNet statistics); None = none.
    `average_rotations`: the backbone's pooled features are the mean over the frame's 4 rotations and their mirror
    images (`dihedral`), so the heads read features that do not depend on how the well was turned."""

    name: str
    in_chans: int
    mode: str  # multitask | classification | regression
    dropout: float = 0.2
    head_hidden: int = 256  # 0: each head is one Linear layer
    time_head: str = "shared"  # shared | per_class | conditioned
    time_nll: bool = False  # gaussian_nll: the time head also predicts a log-variance
    context_frames: int = 1
    temporal_fusion: str = "channels"
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None
    average_rotations: bool = False  # pooled features averaged over the frame's 8 rotations and reflections

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("input_mean", "input_std"):
            d[key] = None if d[key] is None else list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        for key in ("input_mean", "input_std"):
            if d.get(key) is not None:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)

    @property
    def feature_frames(self) -> int:
        """Frames whose pooled features the heads read side by side, oldest first: the context's under `features`
        fusion, 1 under `channels` (all frames enter the first convolution together)."""
        return self.context_frames if self.temporal_fusion == "features" else 1

    @property
    def stem_chans(self) -> int:
        """Channels the first convolution sees: one frame's under `features` fusion, all of them otherwise."""
        return self.in_chans // self.feature_frames


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rotations and reflections of square images `[..., H, W]`: a well's cells have no up, down or left, so
    features averaged over them no longer vary with the frame's orientation (measured: docs/VALIDATION.md, "What
    else was tried on the probe")."""
    turns = [torch.rot90(x, k, (-2, -1)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


def make_head(in_features: int, hidden: int, dropout: float, out_features: int = 1) -> nn.Sequential:
    """`hidden` 0: Dropout -> Linear (a linear head, what `training.strategy` probe and lp_ft fit in closed form);
    otherwise Linear -> ReLU -> Dropout -> Linear."""
    if hidden == 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, out_features))
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, out_features)
    )


def _check_spec(spec: ModelSpec) -> None:
    if spec.time_head not in TIME_HEADS:
        raise BadInputError(f"multitask.time_head {spec.time_head!r}: choose one of {', '.join(TIME_HEADS)}")
    if spec.time_head != "shared" and spec.mode != "multitask":
        raise BadInputError(f"multitask.time_head {spec.time_head!r} needs task.mode multitask")
    if spec.temporal_fusion not in FUSIONS or spec.in_chans % spec.context_frames:
        raise BadInputError(f"model spec: temporal_fusion {spec.temporal_fusion!r} with {spec.in_chans} channels "
                            f"of {spec.context_frames} frames does not fit")


class MultiTaskNet(nn.Module):
    """`forward(x [B, C, H, W] float32)` -> `{"infected": logit [B], "time": scaled time [B]}` (only the
    heads of the task mode). `time_hours` maps the scaled output back to hours with buffers stored in the
    state dict, so a checkpoint alone gives hours.

    Time head variants (`spec.time_head`): `shared`, one output; `per_class`, one output per class
    (`time_per_class` [B, 2], column 0 uninfected, 1 infected) of which `time` is the predicted class's,
    so inference needs no label; `conditioned`, the head also sees the classification logit, detached so
    the time loss cannot bend the classifier towards what helps regression. With `spec.time_nll` the head
    also gives `time_logvar` [B] (log-variance on the scaled axis; `time_logvar_per_class` for per_class).

    `weights`: the backbone's starting weights in the library's names (a state dict; a 3-channel stem is adapted
    to the spec's channels), with `source` naming them in errors; `pretrained`: the library's ImageNet weights.
    """

    def __init__(self, spec: ModelSpec, *, pretrained: bool = False, weights: dict[str, torch.Tensor] | None = None,
                 source: str = "") -> None:
        super().__init__()
        _check_spec(spec)
        self.spec = spec
        family, lib_name = resolve_name(spec.name)
        trunk = timm_trunk(lib_name, pretrained=pretrained) if family == "timm" else create_trunk(spec.name)
        if pretrained and family == "torchvision":
            weights, source = pretrained_state_dict(lib_name), f"torchvision ImageNet weights of {lib_name}"
        elif pretrained:
            weights, source = trunk.module.state_dict(), f"timm ImageNet weights of {lib_name}"
        self.family = trunk.family
        adapt_stem(trunk.module, spec.stem_chans)
        if weights is not None:
            load_trunk_weights(trunk, weights, source)
        self.backbone = trunk.module
        n_features = trunk.n_features * spec.feature_frames
        self.n_features = n_features
        self.cls_head = make_head(n_features, spec.head_hidden, spec.dropout) if spec.mode != "regression" else None
        n_time = (2 if spec.time_head == "per_class" else 1) * (2 if spec.time_nll else 1)
        n_in = n_features + (1 if spec.time_head == "conditioned" else 0)
        self.time_head = (
            make_head(n_in, spec.head_hidden, spec.dropout, n_time) if spec.mode != "classification" else None
        )
        self.register_buffer("time_shift", torch.zeros(()))
        self.register_buffer("time_scale", torch.ones(()))
        # Not persistent: the spec is their one home, so checkpoints from before them load unchanged.
        mean, std = spec.input_mean, spec.input_std
        if (mean is None) != (std is None) or (mean is not None and not len(mean) == len(std) == spec.stem_chans):
            raise BadInputError(f"model spec: input_mean/input_std need {spec.stem_chans} values each")
        self.register_buffer("input_mean", None if mean is None else torch.tensor(mean).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("input_std", None if std is None else torch.tensor(std).view(1, -1, 1, 1),
                             persistent=False)

    def set_time_scaling(self, shift: float, scale: float) -> None:
        self.time_shift.fill_(shift)
        self.time_scale.fill_(scale)

    def time_hours(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled * self.time_scale + self.time_shift

    def scale_time(self, hours: torch.Tensor) -> torch.Tensor:
        return (hours - self.time_shift) / self.time_scale

    def feature_layer(self) -> nn.Module:
        """The last backbone block with spatial maps (Grad-CAM's layer; `backbone.layer4` for ResNets)."""
        if self.spec.feature_frames > 1:
            raise BadInputError("explain: a model with temporal_fusion features runs its backbone once per context "
                                "frame; Grad-CAM supports channels fusion only")
        if self.spec.average_rotations:
            raise BadInputError("explain: a model with model.average_rotations runs its backbone once per rotation "
                                "and reflection of the frame; Grad-CAM needs one pass (train without it to explain)")
        return feature_layer(self.backbone, self.family)

    def stem_input(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled frames `[B, stem_chans, H, W]` -> what the backbone's stem takes: the input statistics of a
        pretrained stem applied (unchanged without them)."""
        if self.input_mean is None:
            return x
        return (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)

    @property
    def orientations(self) -> int:
        """Orientations of each frame that the backbone sees: the 8 `dihedral` ones with `spec.average_rotations`."""
        return 8 if self.spec.average_rotations else 1

    def oriented_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, stem_chans, H, W]` -> the backbone's pooled features of each orientation, `[orientations, B, F]`
        (the probe fits its heads on every orientation's features as training rows of their own)."""
        x = self.stem_input(x)
        if not self.spec.average_rotations:
            return self.backbone(x).unsqueeze(0)
        if x.shape[-1] != x.shape[-2]:
            raise BadInputError(f"model.average_rotations needs square inputs, got {x.shape[-2]} x {x.shape[-1]}")
        return torch.stack([self.backbone(t) for t in dihedral(x)])

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, stem_chans, H, W]` (one frame; under `channels` fusion all frames stacked) -> the backbone's pooled
        features `[B, F]` (with `spec.average_rotations`, their mean over the 8 `dihedral` transforms)."""
        if not self.spec.average_rotations:
            return self.backbone(self.stem_input(x))  # the training hot path: no stack / mean copy
        return self.oriented_features(x).mean(0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, in_chans, H, W]` -> pooled features `[B, n_features]` (what both heads read)."""
        if self.spec.feature_frames > 1:
            # [B, K*C, H, W] -> [B*K, C, H, W]: each frame through the backbone, features concatenated oldest first
            frames = x.reshape(-1, self.spec.stem_chans, x.shape[-2], x.shape[-1])
            return self.frame_features(frames).reshape(-1, self.n_features)
        return self.frame_features(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.features(x))

    def heads(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both heads on pooled features `[B, n_features]` (the probe strategy evaluates them on cached ones)."""
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




@dataclass
class StartingWeights:
    """Where a new run's backbone starts: a state dict in the library's names, or (`checkpoint` set: that
    checkpoint's model_spec) a whole cellmtl network. `source` names it in messages; `mean`/`std` are the input
    statistics its training used (RGB for library weights, per stem channel for a cellmtl checkpoint; None: none)."""

    source: str
    state: dict[str, torch.Tensor]
    checkpoint: dict[str, Any] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def starting_weights(cfg: Config) -> StartingWeights | None:
    """`model.weights` (a local file) or `model.pretrained` (the library's ImageNet weights); None = random init."""
    m = cfg.model
    if m.weights is not None:
        f: WeightsFile = read_weights_file(m.weights)
        if f.spec is not None:
            mean, std = f.spec.get("input_mean"), f.spec.get("input_std")
            return StartingWeights(str(f.path), f.state, f.spec, mean and tuple(mean), std and tuple(std))
        return StartingWeights(str(f.path), f.state, None, *pretrained_statistics(m.name))
    if m.pretrained:
        family, lib_name = resolve_name(m.name)
        if family == "timm":
            trunk = timm_trunk(lib_name, pretrained=True)
            return StartingWeights(f"timm ImageNet weights of {lib_name}", trunk.module.state_dict(), None,
                                   trunk.mean, trunk.std)
        return StartingWeights(f"torchvision ImageNet weights of {lib_name}", pretrained_state_dict(lib_name), None,
                               *pretrained_statistics(m.name))
    return None


def input_statistics(cfg: Config, start: StartingWeights | None, stem: int) -> tuple[tuple[float, ...] | None, ...]:
    """(mean, std) per stem channel that `forward` applies, by `model.input_norm`: `auto` = those the starting
    weights were trained with (none for a random init or a cellmtl checkpoint trained without), `imagenet` = the
    backbone's pretraining statistics, `none`."""
    mode = cfg.model.input_norm
    if mode == "none" or (mode == "auto" and start is None):
        return None, None
    if mode == "auto" and start is not None and start.checkpoint is not None:
        return start.mean, start.std
    mean, std = (start.mean, start.std) if mode == "auto" and start is not None else pretrained_statistics(
        cfg.model.name)
    return channel_statistics(mean, stem), channel_statistics(std, stem)


def spec_from_config(cfg: Config, n_channels: int, start: StartingWeights | None = None) -> ModelSpec:
    """The network a config asks for, on `n_channels` image channels (times the temporal context frames).
    `start`: the weights it will start from, which decide `model.input_norm` and `model.temporal_fusion` `auto`
    (a cellmtl checkpoint's own; else `features` fusion for pretrained weights, whose stem expects one image)."""
    m = cfg.model
    frames = len(cfg.data.temporal_context_hours or [0])
    nll = cfg.multitask.regression_loss == "gaussian_nll"
    fusion = m.temporal_fusion
    if fusion == "auto":
        if start is not None and start.checkpoint is not None:
            fusion = str(start.checkpoint.get("temporal_fusion", "channels"))
        else:
            fusion = "features" if start is not None else "channels"
    if frames == 1:
        fusion = "channels"  # one frame: the two are the same network
    stem = n_channels if fusion == "features" else n_channels * frames
    mean, std = input_statistics(cfg, start, stem)
    assert m.head_hidden is not None  # resolved by Config
    return ModelSpec(m.name, n_channels * frames, cfg.task.mode, m.dropout, m.head_hidden, cfg.multitask.time_head,
                     nll, frames, fusion, mean, std, m.average_rotations)


def build_model(spec: ModelSpec, *, pretrained: bool = False, start: StartingWeights | None = None) -> MultiTaskNet:
    """The network of `spec`; its backbone (and, from a cellmtl checkpoint, its heads where they fit) start from
    `start`, or from the library's ImageNet weights with `pretrained`."""
    if start is None:
        return MultiTaskNet(spec, pretrained=pretrained)
    if start.checkpoint is None:
        return MultiTaskNet(spec, weights=start.state, source=start.source)
    return from_checkpoint_weights(spec, start)


def from_checkpoint_weights(spec: ModelSpec, start: StartingWeights) -> MultiTaskNet:
    """A new network whose backbone is the cellmtl checkpoint's (same backbone, channels and fusion, or exit 2
    naming the file and what differs), with the checkpoint's heads where their shapes fit (the new run sets its own
    time scaling)."""
    assert start.checkpoint is not None
    old = ModelSpec.from_dict(start.checkpoint)
    for key in ("name", "in_chans", "temporal_fusion", "context_frames"):
        if getattr(spec, key) != getattr(old, key):
            raise BadInputError(f"model.weights {start.source}: the checkpoint's {key} is {getattr(old, key)!r}, "
                                f"this run's is {getattr(spec, key)!r}")
    model = MultiTaskNet(spec)
    backbone = {k.removeprefix("backbone."): v for k, v in start.state.items() if k.startswith("backbone.")}
    load_trunk_weights(Trunk(model.backbone, 0, "", model.family), backbone, start.source)
    own = model.state_dict()
    heads = {k: v for k, v in start.state.items() if not k.startswith("backbone.") and k in own
             and k not in ("time_shift", "time_scale") and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(heads, strict=False)
    return model


__all__ += ["RESNETS", "StartingWeights", "starting_weights", "stem_name"]
