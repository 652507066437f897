"""Typed, validated configuration (SPEC section 4).

The config is validated once, at load: an unknown key, a wrong type or an impossible value is a
`BadInputError` naming the dotted key and the value. After that, code receives `Config` objects,
never loose dicts. The resolved config is saved into every run folder and checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cellmtl.errors import BadInputError
from cellmtl.fileio import write_yaml

TaskMode = Literal["multitask", "classification", "regression"]
CLS_METRICS = ("cls_auc", "cls_acc", "cls_precision", "cls_recall", "cls_f1", "cls_loss")
REG_METRICS = ("reg_mae", "reg_rmse", "reg_mse", "reg_mae_infected", "reg_mae_uninfected", "reg_loss")


class _Strict(BaseModel):
    # extra="forbid" is what turns a misplaced or misspelt key into an error instead of silence.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FrameSelection(_Strict):
    """Which frames of each stack a split uses."""

    stride: int = Field(1, ge=1, description="keep every n-th frame of each stack (1 = all); applied first, to the "
                        "frames data.pre_onset keeps")
    hour_window: tuple[float, float] | None = Field(
        None, description="[min, max] hours_since_start of the frames kept (inclusive), e.g. [2.0, 24.0]; null = all "
        "hours"
    )
    max_per_stack: int | None = Field(None, ge=1, description="at most this many frames per stack, evenly spaced over "
                                      "those left (every frame weighs the same in training, so long stacks otherwise "
                                      "dominate); null = no limit")

    @field_validator("hour_window")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"hour_window must be [min, max], got {list(v)}")
        return v


class FramesConfig(_Strict):
    train: FrameSelection = Field(default_factory=FrameSelection, description="frames of the training stacks that "
                                  "training draws from")
    val: FrameSelection = Field(default_factory=FrameSelection, description="frames of the validation stacks, scored "
                                "after every epoch (and by evaluate --split val)")
    test: FrameSelection = Field(default_factory=FrameSelection, description="frames of the test stacks (evaluate "
                                 "--split test, results.json's test metrics)")


class AugmentConfig(_Strict):
    """Training-only augmentation that respects microscopy (no colour jitter, no RGB ops)."""

    enabled: bool = Field(True, description="false = no augmentation at all, whatever the keys below say")
    flips: bool = Field(True, description="random horizontal and vertical flips (each with probability 0.5)")
    rot90: bool = Field(True, description="random rotation by 0, 90, 180 or 270 degrees (cells have no "
                        "preferred orientation)")
    intensity_scale: float = Field(0.1, ge=0.0, lt=1.0, description="per-channel gain drawn uniformly in 1 +/- this, "
                                   "after normalisation (0 = off)")
    intensity_offset: float = Field(0.05, ge=0.0, description="per-channel offset drawn uniformly in +/- this, in "
                                    "normalised units (0 = off)")
    noise_std: float = Field(0.0, ge=0.0, description="std of gaussian noise added after normalisation, in "
                             "normalised units (0 = off)")
    crop_scale: float = Field(
        1.0, gt=0.0, le=1.0, description="random square crops of this to 1.0 of the side (e.g. 0.6), resized back to "
        "the input size; 1.0 = off"
    )


class NormalizationConfig(_Strict):
    """`per_image` (default): each image scaled by its own per-channel percentiles; robust to gain and
    exposure differences between stacks, which dominate when a model learns from a few dozen wells.
    `dataset`: per-channel percentiles measured once on training frames; keeps absolute brightness (a
    reporter that is dark in mock wells stays dark), for experiments imaged with identical settings.
    `range_floor` (per_image, opt-in): each channel's range is widened by this fraction of a bright
    training image's range, so a nearly empty channel (a mock well's reporter) stays dark instead of
    having its camera noise stretched to full scale (docs/VALIDATION.md, "Normalisation": it made new mock
    wells look infected less often, but did not help the time head)."""

    mode: Literal["dataset", "per_image"] = Field(
        "per_image", description="per_image: each image scaled by its own per-channel percentiles (robust to gain "
        "and exposure differences between stacks, which dominate what a model learns from a few dozen wells); "
        "dataset: per-channel percentiles measured once on training frames (keeps absolute brightness, e.g. a "
        "reporter that is dark in mock wells; for stacks imaged with identical settings). See "
        "docs/GUIDE.md, \"Which normalisation?\""
    )
    percentiles: tuple[float, float] = Field(
        (1.0, 99.8), description="[low, high] intensity percentiles mapped to 0 and 1, per channel (cellpose's "
        "normalize99); 0 <= low < high <= 100"
    )
    sample_frames: int = Field(256, ge=1, description="training frames sampled to measure the dataset percentiles "
                               "(mode dataset) or the range_floor reference range")
    range_floor: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="per_image: add this fraction (e.g. 0.1) of the 90th-percentile training-image range to each "
        "channel's range, so a near-empty channel (a mock well's reporter) stays dark instead of its camera noise "
        "being stretched to full scale; 0 = plain per-image scaling. Not the default: it did not help the time "
        "head. ONNX export carries it; bioimageio export refuses it",
    )

    @field_validator("percentiles")
    @classmethod
    def _pct(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0.0 <= v[0] < v[1] <= 100.0):
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {list(v)}")
        return v


class DataConfig(_Strict):
    manifest: Path | None = Field(
        None, description="the manifest: one row per stack (stack_id, path, condition[, infection_onset_hour, "
        "frame_interval_hours, start_hour, split, group, well, channels]), CSV (, ; or tab; UTF-8, UTF-16 or "
        "cp1252) or .xlsx; see the README. Or give infected_dir + uninfected_dir instead (not both). Relative "
        "paths: from the current folder, then the config's folder"
    )
    infected_dir: Path | None = Field(
        None, description="instead of a manifest: a folder of TIFF stacks of infected wells, one stack per file "
        "(stack_id = file stem); needs uninfected_dir"
    )
    uninfected_dir: Path | None = Field(
        None, description="instead of a manifest: a folder of TIFF stacks of uninfected (mock) wells; needs "
        "infected_dir"
    )
    train_stacks: list[str] = Field(default_factory=list, description="stack_ids for training; explicit lists win "
                                    "over the manifest's split column ([] = not given)")
    val_stacks: list[str] = Field(default_factory=list, description="stack_ids for validation (picks best.pt)")
    test_stacks: list[str] = Field(default_factory=list, description="stack_ids held out for the final test")
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="automatic split (no lists, no split column): "
                                "share of stacks for val; stratified by condition, grouped by the manifest's group, "
                                "seeded by seed")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="automatic split: share of stacks for test (0 = "
                                 "no test split); val_fraction + test_fraction < 1")
    frame_interval_hours: float = Field(1.0, gt=0.0, description="hours between frames where neither the manifest's "
                                        "frame_interval_hours column nor the file's own metadata (ImageJ finterval, "
                                        "OME TimeIncrement/DeltaT, NGFF time scale) says")
    channels: list[int] | list[str] | None = Field(
        None, description="channels the model sees, in this order: null = all, a list of indices (e.g. [0, 2]), or "
        "of names (e.g. [DAPI, ICP4]) matched against the manifest's channels column or the files' own channel "
        "names, so files that store their stains in different orders are read alike (docs/GUIDE.md, "
        "\"Channels by name\")"
    )
    image_size: int = Field(128, ge=16, le=2048, description="model input side in pixels: each frame is resized "
                            "(bilinear, antialiased) to image_size x image_size; unused with tile_size (the tile is "
                            "the input)")
    tile_size: int | None = Field(
        None, ge=16, le=4096, description="tiles of this side (pixels, after downsample) at native resolution: "
        "training draws random tiles, everything else scores every tile of a fixed grid and a frame's outputs "
        "are aggregated from its tiles (mean prob_infected, median time); null = the whole frame resized to "
        "image_size. Needs training.strategy finetune"
    )
    tile_overlap: float = Field(0.0, ge=0.0, lt=0.9, description="with tile_size: fraction of a tile's side shared "
                                "by neighbours on the grid")
    downsample: int = Field(1, ge=1, le=64, description="with tile_size: block-average frames by this integer "
                            "factor first (1 = native resolution)")
    tiles_per_frame: int = Field(4, ge=1, le=1024, description="with tile_size: random training tiles per frame and "
                                 "epoch")
    pre_onset: Literal["drop", "keep", "as_uninfected"] = Field(
        "drop", description="frames of an infected stack taken before its onset: drop (not used), keep (negative "
        "time targets), as_uninfected (label 0, time = hours since start, like a mock well)"
    )
    temporal_context_hours: list[float] | None = Field(
        None, description="frames at these hour offsets (e.g. [-6, -3, 0]) stacked as channels (\"temporal "
        "pseudo-RGB\"), clamped to the stack's first and last frame; null = one frame (see model.temporal_fusion)"
    )
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes; 0 = read in the main process (best "
                             "on <= 4 CPU cores without a GPU, see docs/PERFORMANCE.md)")
    cache: Literal["none", "memory"] = Field(
        "none", description="memory: decode, resize and normalise every frame once into RAM (float32 "
        "frames x channels x image_size^2 x 4 bytes), then only augmentation is per sample; none: read each "
        "sample from disk"
    )
    balance: Literal["none", "sampler", "weights"] = Field(
        "none",
        description="few infected (or few mock) wells: sampler = each epoch draws training frames with "
        "replacement, both classes equally often; weights = classification loss weights inverse to class "
        "frequency on the training split; none = as they come",
    )
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig, description="how raw "
                                               "intensities become model inputs")
    frames: FramesConfig = Field(default_factory=FramesConfig, description="which frames each split uses")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="augmentation of training samples "
                                   "(none at validation, evaluation or prediction)")

    @field_validator("channels", mode="before")
    @classmethod
    def _channels_kind(cls, v: Any) -> Any:
        """All indices or all names, in plain words; YAML's yes/no would otherwise become indices 1/0."""
        if isinstance(v, list):
            if any(isinstance(c, bool) for c in v):
                raise ValueError(f"channels must be indices or names, got {v} (quote names such as 'yes' or 'on')")
            if any(isinstance(c, str) for c in v):
                if not all(isinstance(c, str) for c in v):
                    raise ValueError(f"channels must be all indices or all names, got {v} (quote names that look "
                                     "like numbers, e.g. '488')")
                return [c.strip() for c in v]
        return v

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[int] | list[str] | None) -> list[int] | list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("channels must be null (all) or a non-empty list of channel indices or names")
            if len(set(v)) != len(v):
                raise ValueError(f"channels must be distinct, got {v}")
            if any(isinstance(c, int) and c < 0 for c in v):
                raise ValueError(f"channels must be non-negative indices, got {v}")
            if any(isinstance(c, str) and not c.strip() for c in v):
                raise ValueError(f"channel names must not be empty, got {v}")
        return v

    @field_validator("temporal_context_hours")
    @classmethod
    def _context(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"temporal_context_hours must be null or distinct hour offsets, e.g. [-6, -3, 0], got {v}")
        return v

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        dirs = (self.infected_dir is not None, self.uninfected_dir is not None)
        if self.manifest is None and not all(dirs):
            raise ValueError("give data.manifest, or both data.infected_dir and data.uninfected_dir")
        if self.manifest is not None and any(dirs):
            raise ValueError("give either data.manifest or data.infected_dir/uninfected_dir, not both")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave stacks for training")
        return self


class ModelConfig(_Strict):
    """The backbone and its heads. With few training wells, start from pretrained weights (`weights` or
    `pretrained`) and `training.strategy: probe` (docs/GUIDE.md, "Few wells? Start from pretrained weights")."""

    name: str = Field("resnet18", description="the backbone: any torchvision classification model (resnet18, "
                      "mobilenet_v2, mobilenet_v3_*, efficientnet_b0, convnext_tiny, regnet_*, ...); timm models "
                      "(timm:NAME) where timm is installed. Its first convolution is adapted to the channel count")
    pretrained: bool = Field(False, description="start from the library's ImageNet weights (torch hub cache; "
                             "downloaded once, so it needs internet the first time); model.weights wins over it")
    weights: Path | None = Field(None, description="start from a local file: a state dict in torchvision or timm "
                                 "names (e.g. `make weights`' .weights/mobilenet_v2_imagenet.pt), or a cellmtl "
                                 "checkpoint (an earlier run's best.pt); null = pretrained or a random init")
    input_norm: Literal["auto", "none", "imagenet"] = Field(
        "auto", description="statistics applied inside the model after data.normalization: auto = those of the "
        "starting weights (ImageNet mean/std for pretrained weights, none for a random init), imagenet, none")
    temporal_fusion: Literal["auto", "channels", "features"] = Field(
        "auto", description="with data.temporal_context_hours: channels = the frames stacked at the first "
        "convolution; features = each frame through the backbone, features concatenated; auto = features for "
        "pretrained weights, channels otherwise")
    average_rotations: bool = Field(
        False, description="average the backbone's pooled features over the frame's 4 rotations and their mirror "
        "images, in training and in every prediction: features that do not depend on the well's orientation "
        "(measured with training.strategy probe: docs/VALIDATION.md); costs 8 backbone passes per frame")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout probability in each head (before its last "
                           "Linear layer)")
    head_hidden: int | None = Field(
        None, ge=0, description="hidden units of each head; 0 = one Linear layer; null = 256 for "
        "training.strategy finetune, 0 for probe and lp_ft (they fit linear heads, so only 0 or null is allowed "
        "there)")


class TaskConfig(_Strict):
    mode: TaskMode = Field("multitask", description="multitask: both heads (infected? and time); classification: "
                           "the infected head only; regression: the time head only (cellmtl compare trains all "
                           "three on the same splits)")


class MultitaskConfig(_Strict):
    infection_onset_hour: float | None = Field(
        0.0, description="hours since start at which infected stacks were infected, for manifest rows without an "
        "infection_onset_hour (time targets are hours since this onset); null = every infected row must give one"
    )
    classification_weight: float = Field(1.0, ge=0.0, description="a in a * BCEWithLogits + b * regression loss "
                                         "(weighting fixed)")
    regression_weight: float = Field(1.0, ge=0.0, description="b in a * BCEWithLogits + b * regression loss "
                                     "(weighting fixed); the time loss is on the scaled time axis "
                                     "(time_scale_hours), so 1 and 1 start the terms at comparable magnitudes")
    pos_weight: float | Literal["auto"] | None = Field(
        None, description="BCE pos_weight (weight of the infected class's term): a number, 'auto' = n_uninfected / "
        "n_infected frames on the training split, or null (1)"
    )
    time_scale_hours: float | None = Field(
        None, gt=0.0, description="hours: time targets are (t - training mean) / this before the regression loss "
        "(SmoothL1's beta of 1 is then about one scale); null = the training split's std"
    )
    time_head: Literal["shared", "per_class", "conditioned"] = Field(
        "shared", description="shared: one time output; per_class: one per class (loss on the true class's, "
        "prediction from the predicted class's); conditioned: the time head also sees the (detached) logit. "
        "Other than shared needs task.mode multitask"
    )
    uninfected_time: Literal["elapsed", "zero", "ignore"] = Field(
        "elapsed", description="time target of uninfected frames: elapsed (hours since start), zero (0 h: no "
        "infection yet), or ignore (no time loss, not in time metrics)"
    )
    regression_loss: Literal["smooth_l1", "l1", "mse", "gaussian_nll"] = Field(
        "smooth_l1", description="the time loss: smooth_l1, l1, mse, or gaussian_nll (the head also predicts a "
        "log-variance; predictions then carry pred_time_std)"
    )
    weighting: Literal["fixed", "uncertainty", "dwa", "gradnorm"] = Field(
        "fixed", description="fixed: classification_weight/regression_weight; uncertainty (Kendall 2018), "
        "dwa (Liu 2019), gradnorm (Chen 2018) adapt the weights during training (task.mode multitask only; tuned "
        "fixed weights are hard to beat: docs/GUIDE.md, \"Multi-task options\")"
    )
    dwa_temperature: float = Field(2.0, gt=0.0, description="weighting dwa: softmax temperature of the loss-ratio "
                                   "weights (higher = closer to equal weights)")
    gradnorm_alpha: float = Field(1.5, ge=0.0, description="weighting gradnorm: restoring-force strength (on the "
                                  "backbone's last convolution); 0 = equal gradient norms")


class TrainingConfig(_Strict):
    strategy: Literal["finetune", "probe", "lp_ft"] = Field(
        "finetune", description="finetune: train everything; probe: frozen backbone, linear heads fitted in closed "
        "form on its features (seconds; best with pretrained weights and few wells); lp_ft: probe, then fine-tune "
        "from it with optimizer.backbone_lr_scale. probe and lp_ft need whole frames (no data.tile_size)")
    epochs: int = Field(50, ge=1, description="passes over the training frames (probe: one fit, whatever this says)")
    batch_size: int = Field(32, ge=1, description="frames per optimiser step (per process under torchrun); also "
                            "the batch of validation")
    select_metric: str | None = Field(None, description="the validation metric that picks best.pt (AUC and accuracy "
                                      "up; MAE and losses down): total_loss or a cls_* / reg_* metric of the task; "
                                      "null = cls_auc, or reg_mae for task.mode regression. total_loss counts both "
                                      "heads (better when val AUC reaches 1.0 in the first epochs)")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after this many epochs without an "
                                                "improvement of select_metric; null = never stop early")
    warmup_epochs: float = Field(1.0, ge=0.0, description="epochs (fractions allowed) of linear learning-rate "
                                 "warm-up, then cosine decay to zero at the last epoch")
    grad_clip_norm: float | None = Field(1.0, gt=0.0, description="clip the gradients' total L2 norm to this; null "
                                         "= no clipping")
    bn_recalibration_samples: int = Field(
        1024, ge=0, description="before each validation, re-estimate BatchNorm statistics on up to this many "
        "training frames, evenly spaced over the training stacks (stable val metrics on small data; 0 = off)"
    )
    amp: bool = Field(True, description="mixed precision on CUDA (bf16 where the GPU supports it, else fp16 with a "
                      "gradient scaler); always off on CPU")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps; "
                        "--device on the command line sets it")
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads for PyTorch; null = all cores this process may use (divided among "
        "torchrun's local processes; measured best on CPU, docs/PERFORMANCE.md)"
    )
    progress: bool = Field(True, description="a progress bar over all epochs' steps with the time left (drawn only "
                           "when stderr is a terminal)")
    compile: bool = Field(False, description="torch.compile the training model (first steps compile; pays off on "
                          "CUDA for long runs)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not v.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {v!r}")
        return v


class OptimizerConfig(_Strict):
    lr: float = Field(0.001, gt=0.0, description="AdamW peak learning rate (after warm-up)")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decoupled weight decay (loss-weighting parameters "
                                "get none)")
    backbone_lr_scale: float | None = Field(
        None, gt=0.0, le=1.0, description="the backbone learns at lr x this; null = 1 for finetune, 0.1 for lp_ft "
        "(a small step keeps the probe's features: Kumar et al. 2022)")


class Config(_Strict):
    experiment_name: str = Field("experiment", description="runs go to {output_dir}/{experiment_name}/{run_id}/; a "
                                 "plain folder name (no / or \\)")
    output_dir: Path = Field(Path("outputs"), description="folder that holds the experiments' run folders "
                             "(relative to the current folder)")
    seed: int = Field(42, description="seeds the automatic split, the sampling, augmentation and initialisation: "
                      "same seed, same splits, same CPU results")
    data: DataConfig = Field(description="where the stacks are, how they are split, read, tiled, normalised and "
                             "augmented")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the backbone, its starting weights and the "
                               "heads. Few wells (under ~30 training stacks)? Start from pretrained weights (e.g. "
                               "name mobilenet_v2 with weights, or pretrained: true with internet) and "
                               "training.strategy probe: docs/GUIDE.md, \"Few wells? Start from "
                               "pretrained weights\"")
    task: TaskConfig = Field(default_factory=TaskConfig, description="which heads are trained")
    multitask: MultitaskConfig = Field(default_factory=MultitaskConfig, description="time targets and how the two "
                                       "losses are combined")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="the training loop: strategy, "
                                     "length, best-epoch selection, device and precision")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="AdamW and its learning rates")

    @field_validator("experiment_name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v in (".", ".."):
            raise ValueError(f"experiment_name must be a plain folder name, got {v!r}")
        return v

    @model_validator(mode="after")
    def _multitask_only(self) -> Config:
        m = self.multitask
        if self.task.mode != "multitask":
            if m.weighting != "fixed":
                raise ValueError(f"multitask.weighting {m.weighting!r} needs task.mode multitask (two losses)")
            if m.time_head != "shared":
                raise ValueError(f"multitask.time_head {m.time_head!r} needs task.mode multitask (a classifier)")
        return self

    @model_validator(mode="after")
    def _tiles(self) -> Config:
        d = self.data
        if d.tile_size is None and (d.downsample != 1 or d.tile_overlap != 0.0):
            raise ValueError("data.downsample and data.tile_overlap need data.tile_size (tiles at native resolution)")
        if d.tile_size is not None and self.training.strategy != "finetune":
            raise ValueError(f"training.strategy {self.training.strategy} fits heads on whole-frame features; with "
                             "data.tile_size use training.strategy finetune")
        return self

    @model_validator(mode="after")
    def _strategy(self) -> Config:
        strategy, hidden = self.training.strategy, self.model.head_hidden
        if hidden is None:
            self.model.head_hidden = 256 if strategy == "finetune" else 0
        elif strategy != "finetune" and hidden != 0:
            raise ValueError(f"training.strategy {strategy} fits linear heads: model.head_hidden must be 0 or null, "
                             f"got {hidden}")
        return self

    @model_validator(mode="after")
    def _select_metric(self) -> Config:
        mode = self.task.mode
        metric = self.training.select_metric
        if metric is None:
            self.training.select_metric = "reg_mae" if mode == "regression" else "cls_auc"
            return self
        allowed = {"total_loss"}
        if mode != "regression":
            allowed.update(CLS_METRICS)
        if mode != "classification":
            allowed.update(REG_METRICS)
        if metric not in allowed:
            raise ValueError(
                f"training.select_metric {metric!r} is not available for task.mode {mode!r}; "
                f"choose one of {sorted(allowed)}"
            )
        return self


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        elif e["type"] == "missing":
            parts.append(f"missing key {loc!r}")
        elif not e["loc"]:  # a check across keys: its input is the whole config, which says nothing
            parts.append(msg)
        else:
            parts.append(f"{loc}: {msg} (got {e.get('input')!r})")
    return f"config {source}: " + "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], value parsed as a YAML scalar or list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise BadInputError(f"--set {item!r}: expected key=value, e.g. training.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise BadInputError(f"--set {item!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `a.b=value` set; unknown keys are left for the schema to reject."""
    out = yaml.safe_load(yaml.safe_dump(raw)) if raw else {}
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise BadInputError(f"--set {item!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return out


def config_from_dict(raw: Any, source: str = "<dict>") -> Config:
    if not isinstance(raw, dict):
        raise BadInputError(f"config {source}: expected a mapping of keys at the top level")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise BadInputError(_format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read YAML, apply `--set` overrides, validate. Relative data paths are resolved later (see `resolve_path`)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise BadInputError(f"config {path}{where}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise BadInputError(f"config {path}: expected a mapping of keys at the top level")
    raw = apply_overrides(raw, overrides or [])
    cfg = config_from_dict(raw, str(path))
    return resolve_paths(cfg, path.parent)


def resolve_path(p: Path, config_dir: Path | None) -> Path:
    """Relative paths: the current folder first (as users type them), then the config's own folder."""
    if p.is_absolute() or config_dir is None or p.exists():
        return p.resolve() if p.exists() else p
    alt = config_dir / p
    return alt.resolve() if alt.exists() else p


def resolve_paths(cfg: Config, config_dir: Path | None) -> Config:
    data = cfg.data
    updates = {}
    for key in ("manifest", "infected_dir", "uninfected_dir"):
        value = getattr(data, key)
        if value is not None:
            updates[key] = resolve_path(value, config_dir)
    model = cfg.model
    if model.weights is not None:
        model = model.model_copy(update={"weights": resolve_path(model.weights, config_dir)})
    return cfg.model_copy(update={"data": data.model_copy(update=updates), "model": model})


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """JSON/YAML-safe dict (paths as strings, tuples as lists); loads back with `config_from_dict`."""
    return cfg.model_dump(mode="json")


def dump_config(cfg: Config, path: Path) -> None:
    write_yaml(path, config_to_dict(cfg))
