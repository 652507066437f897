"""Backbones: any torchvision classification model, or a timm model where timm is installed, as a feature trunk.

`create_trunk(name)` returns the network without its classifier (its last `nn.Linear` replaced by `Identity`, or
timm's `num_classes=0`), so it maps `[B, 3, H, W]` to pooled features `[B, F]`; `adapt_stem` then gives its first
convolution C input channels the way timm does. Weights come from a local file (`read_weights_file`, torchvision or
timm names, or a cellmtl checkpoint) or the library's own ImageNet files (`pretrained_state_dict`), and
`load_trunk_weights` checks every key and shape against the trunk: a file that does not fit is a `BadInputError`
naming the file and the first key at fault, never a half-loaded model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm

from cellmtl.errors import BadInputError

TORCHVISION_MODELS = frozenset(tvm.list_models(module=tvm))  # classification models only
TIMM_PREFIX = "timm:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision models whose auxiliary classifiers would change the training-mode output; built without them
_NO_AUX = {"googlenet": {"aux_logits": False, "init_weights": True}, "inception_v3": {"aux_logits": False,
                                                                                     "init_weights": True}}


@dataclass
class Trunk:
    """A classification network without its classifier. `head`: the dotted name of the removed classifier (its
    keys in a weights file are expected and skipped); `mean`/`std`: the RGB input statistics its pretrained
    weights were trained with."""

    module: nn.Module
    n_features: int
    head: str
    family: str  # torchvision | timm
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_name(name: str) -> tuple[str, str]:
    """`model.name` -> (family, the library's own name): `timm:NAME` is timm's; a torchvision classification model
    name is torchvision's; any other name is timm's where timm is installed and knows it."""
    if name.startswith(TIMM_PREFIX):
        if not timm_available():
            raise BadInputError(f"model.name {name!r} needs timm: pip install 'cellmtl[timm]'")
        return "timm", name.removeprefix(TIMM_PREFIX)
    if name in TORCHVISION_MODELS:
        return "torchvision", name
    if timm_available():
        import timm

        if name in timm.list_models():
            return "timm", name
    examples = "resnet18, mobilenet_v2, efficientnet_b0, convnext_tiny, regnet_y_400mf"
    extra = "" if timm_available() else "; timm models need timm (pip install 'cellmtl[timm]')"
    raise BadInputError(f"model.name {name!r} is not a torchvision classification model (e.g. {examples}){extra}")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def torchvision_trunk(name: str) -> tuple[nn.Module, Trunk]:
    """(the full torchvision model, its trunk): the classifier is the model's last `nn.Linear` (`fc` of ResNets
    and RegNets, `classifier.1` of MobileNetV2 and EfficientNets, `classifier.2` of ConvNeXt, `heads.head` of
    ViTs); whatever runs before it (pooling, ConvNeXt's LayerNorm) stays in the trunk."""
    model = tvm.get_model(name, weights=None, **_NO_AUX.get(name, {}))
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    last = model.get_submodule(linears[-1]) if linears else None
    if not isinstance(last, nn.Linear) or last.out_features != 1000:
        raise BadInputError(f"model.name {name!r}: no final Linear classifier to replace (e.g. squeezenet's is a "
                            "convolution); choose another torchvision model")
    _set_submodule(model, linears[-1], nn.Identity())
    return model, Trunk(model, last.in_features, linears[-1], "torchvision")


def timm_trunk(name: str, *, pretrained: bool = False) -> Trunk:
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except Exception as exc:  # noqa: BLE001 - offline hub access and unknown names get one actionable line
        if not pretrained:
            raise BadInputError(f"model.name {TIMM_PREFIX}{name}: timm could not build it ({exc})") from None
        raise BadInputError(
            f"model.pretrained: timm could not load ImageNet weights for {name} ({exc.__class__.__name__}); "
            f"offline, run timm.create_model({name!r}, pretrained=True) on a machine with internet and copy its "
            "Hugging Face cache (~/.cache/huggingface) here, or save the model's state_dict() to a file and set "
            "model.weights: PATH"
        ) from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    width = getattr(model, "head_hidden_size", None) or model.num_features  # after a pre-logits layer where one is
    return Trunk(model, int(width), str(cfg.get("classifier", "head")), "timm",
                 tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))


def pretrained_statistics(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) RGB input statistics of the model's pretrained weights: ImageNet's for torchvision; timm's
    pretrained_cfg (some timm weights use 0.5 / 0.5)."""
    family, lib_name = resolve_name(name)
    if family == "timm":
        import timm

        cfg = timm.get_pretrained_cfg(lib_name)
        if cfg is not None:
            return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


def create_trunk(name: str) -> Trunk:
    """The trunk for `model.name`, randomly initialised (load weights with `load_trunk_weights`)."""
    family, lib_name = resolve_name(name)
    return timm_trunk(lib_name) if family == "timm" else torchvision_trunk(lib_name)[1]


def stem_name(module: nn.Module) -> str:
    """The dotted name of the first convolution (the stem that sees the image: `conv1` of ResNets, `features.0.0`
    of MobileNets, `conv_proj` of ViTs)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    raise BadInputError(f"{module.__class__.__name__}: no Conv2d stem to adapt to the image channels")


def adapt_conv_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB conv weight `[O, 3, k, k]` -> `[O, in_chans, k, k]`, as timm's `adapt_input_conv`: sum for one
    channel; otherwise repeat the RGB filters and rescale by 3/C so activations keep their magnitude."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / 3)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (3.0 / in_chans)


def adapt_stem(module: nn.Module, in_chans: int) -> None:
    """Replace the stem by a freshly initialised convolution of `in_chans` inputs, otherwise identical."""
    name = stem_name(module)
    old = module.get_submodule(name)
    assert isinstance(old, nn.Conv2d)
    if old.groups != 1:
        raise BadInputError(f"{module.__class__.__name__}: the stem {name} is a grouped convolution; not supported")
    new = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=old.bias is not None, padding_mode=old.padding_mode)
    _set_submodule(module, name, new)


def channel_statistics(rgb: Sequence[float], in_chans: int) -> tuple[float, ...]:
    """RGB input statistics for a stem of `in_chans` channels adapted by `adapt_conv_weight`: channel k uses the
    RGB filter k mod 3, so it gets that colour's value; one channel (the filters summed) gets their mean."""
    if in_chans == 1:
        return (float(sum(rgb) / len(rgb)),)
    return tuple(float(rgb[k % len(rgb)]) for k in range(in_chans))


def load_trunk_weights(trunk: Trunk, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a state dict in the library's own names into the trunk (whose stem may already have C channels: a
    3-channel stem weight in the file is adapted with `adapt_conv_weight`). The removed classifier's keys are
    skipped; `num_batches_tracked` may be missing (not a weight). Any other missing or extra key, or any shape
    that does not fit, is a BadInputError naming `source` and the first such key, before anything is copied."""
    own = trunk.module.state_dict()
    stem_key = f"{stem_name(trunk.module)}.weight"
    ready: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue
            raise BadInputError(f"model.weights {source}: key {key!r} is missing (the file does not fit "
                                f"{trunk.family} names of this model.name)")
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise BadInputError(f"model.weights {source}: key {key!r} is not a tensor")
        if key == stem_key and value.ndim == 4 and value.shape[1] == 3 and target.shape[1] != 3:
            value = adapt_conv_weight(value, target.shape[1])
        if tuple(value.shape) != tuple(target.shape):
            raise BadInputError(f"model.weights {source}: key {key!r} has shape {list(value.shape)}, the model "
                                f"needs {list(target.shape)}")
        ready[key] = value
    head = trunk.head + "."
    extra = [k for k in state if k not in own and not k.startswith(head) and k != trunk.head]
    if extra:
        raise BadInputError(f"model.weights {source}: key {extra[0]!r} is not part of this model "
                            f"({len(extra)} unexpected key(s); is model.name the network the file was saved from?)")
    trunk.module.load_state_dict(ready, strict=False)


def pretrained_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights, from the torch hub cache, downloaded there once if missing."""
    weights = tvm.get_model_weights(name).DEFAULT
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - any download/IO failure gets the same actionable message
        raise BadInputError(
            f"model.pretrained: could not load ImageNet weights for {name} ({exc.__class__.__name__}); "
            f"offline, download {weights.url} and put it at {cached}, or set model.weights to a local file "
            "(docs/GUIDE.md, \"Few wells? Start from pretrained weights\"), or set model.pretrained: false"
        ) from None


@dataclass
class WeightsFile:
    """A `model.weights` file: a plain state dict (`spec` None), or a cellmtl checkpoint (`spec` its model_spec,
    `state` the whole network's weights, heads included)."""

    path: Path
    state: dict[str, torch.Tensor]
    spec: dict[str, Any] | None = None


def read_weights_file(path: str | Path) -> WeightsFile:
    """Read `model.weights` with `weights_only=True`: a cellmtl checkpoint, a state dict, or a dict that holds one
    under `state_dict` or `model` (common in saved training states); `module.` prefixes (DDP) are dropped."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"model.weights: file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - foreign or corrupt files: one clear line
        raise BadInputError(f"model.weights {path}: could not be read ({exc.__class__.__name__})") from None
    if isinstance(obj, dict) and "model" in obj and "model_spec" in obj:
        return WeightsFile(path, dict(obj["model"]), dict(obj["model_spec"]))
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadInputError(f"model.weights {path}: not a state dict of tensors nor a cellmtl checkpoint")
    return WeightsFile(path, {k.removeprefix("module."): v for k, v in obj.items()})


def rename_by_position(
    src: Mapping[str, torch.Tensor], target: Mapping[str, tuple[int, ...]], source: str
) -> dict[str, torch.Tensor]:
    """Give the tensors of `src` the names of `target` (name -> shape) position by position, for files saved under
    another version's names. Counts and every shape must agree: a ValueError names the first that does not."""
    if len(src) != len(target):
        raise ValueError(f"{source}: {len(src)} tensors, the model has {len(target)}")
    out = {}
    for (old, value), (new, shape) in zip(src.items(), target.items(), strict=True):
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {old!r} has shape {list(value.shape)}, {new!r} needs {list(shape)}")
        out[new] = value.clone()
    return out


def check_imagenet_statistics(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Trained weights, not a fresh initialisation: BatchNorm running statistics that moved away from their initial
    0 / 1, and first-layer filters that agree across colours (an ImageNet network's edge detectors respond to
    luminance, so a filter's red and green taps correlate: 0.62 for torchvision's MobileNetV2; random filters
    give about 0). A ValueError says which check failed."""
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    if not means or all(float(m.abs().max()) == 0 for m in means) or all(bool((v == 1).all()) for v in variances):
        raise ValueError(f"{source}: BatchNorm running statistics are at their initial values: not trained weights")
    first = next(v for v in state.values() if v.ndim == 4 and v.shape[1] == 3)
    corr = float(torch.corrcoef(torch.stack([first[:, 0].flatten(), first[:, 1].flatten()]))[0, 1])
    if corr < 0.3:
        raise ValueError(f"{source}: first-layer filters do not agree across colours (red/green correlation "
                         f"{corr:.2f}): not trained weights")


def feature_layer(backbone: nn.Module, family: str) -> nn.Module:
    """The last block that gives spatial feature maps `[B, K, h, w]` (Grad-CAM's layer): `layer4` of ResNets,
    `trunk_output` of RegNets, `features` of MobileNets, EfficientNets, ConvNeXts, DenseNets and VGGs; timm's last
    `feature_info` module. Transformers (ViT, Swin) have none in that layout."""
    if family == "timm":
        info = getattr(backbone, "feature_info", None)
        if info:
            return backbone.get_submodule(info[-1]["module"])
    for name in ("layer4", "trunk_output", "features", "Mixed_7c", "inception5b", "conv5", "layers"):
        layer = getattr(backbone, name, None)
        if isinstance(layer, nn.Module):
            if name == "features" and backbone.__class__.__name__.startswith("SwinTransformer"):
                break  # channels-last [B, h, w, K] maps
            return layer
    raise BadInputError(f"{backbone.__class__.__name__} has no convolutional feature block (Grad-CAM needs one)")
