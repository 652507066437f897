"""From a validated config to per-frame samples: the experiment, its sample index, the Dataset.

The sample index is a handful of numpy arrays (one entry per frame), and frames are read lazily by
`StackReader`s inside DataLoader workers, so memory stays flat however many stacks an experiment has.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from cellmtl.config import AugmentConfig, Config, FrameSelection
from cellmtl.data.channels import TrainedChannels, checkpoint_channels, match_channels
from cellmtl.data.manifest import (
    FROM_CONFIG,
    FROM_FILE,
    StackRecord,
    load_manifest,
    records_from_dirs,
)
from cellmtl.data.readers import StackInfo, StackReader, probe_stack
from cellmtl.data.splits import assign_splits
from cellmtl.data.targets import hours_since_start, select_frames, time_targets
from cellmtl.data.tiles import TileSpec, downsample, grid_shape, grid_tiles, random_tile
from cellmtl.data.transforms import Normalizer, augment, fit_normalizer, resize
from cellmtl.errors import BadInputError, all_culprits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleIndex:
    """One entry per frame. `infected` is -1 and `time_target` NaN where unknown (unlabelled stacks)."""

    stack: np.ndarray  # int32, index into the experiment's stack list
    frame: np.ndarray  # int32, frame number within the stack
    hours: np.ndarray  # float32, hours since experiment start
    infected: np.ndarray  # int8: 1, 0 or -1
    time_target: np.ndarray  # float32 hours (since onset if infected, since start if not)

    def __len__(self) -> int:
        return len(self.stack)

    def repeat(self, k: int) -> SampleIndex:
        """Every entry k times in a row: the index of `k` random training tiles per frame."""
        return SampleIndex(*(np.repeat(getattr(self, f), k) for f in SampleIndex.__annotations__))

    @staticmethod
    def concat(parts: Sequence[SampleIndex]) -> SampleIndex:
        if not parts:
            empty = np.zeros(0)
            return SampleIndex(*(empty.astype(t) for t in ("int32", "int32", "float32", "int8", "float32")))
        return SampleIndex(*(np.concatenate([getattr(p, f) for p in parts]) for f in SampleIndex.__annotations__))


def stack_index(
    rec: StackRecord,
    info: StackInfo,
    stack_no: int,
    selection: FrameSelection,
    pre_onset: str,
    uninfected_time: str = "elapsed",
) -> SampleIndex:
    """Frames of one stack, with targets (SPEC section 1), after pre-onset policy and frame selection."""
    hours = hours_since_start(info.n_frames, rec.frame_interval_hours, rec.start_hour, rec.frame_hours)
    if rec.infected is None:
        target = np.full(hours.shape, np.nan)
        label = np.full(hours.shape, -1, dtype=np.int8)
        keep = np.ones(hours.shape, dtype=bool)
    else:
        target, label, keep = time_targets(hours, rec.infected, rec.onset_hour, pre_onset, uninfected_time)
    idx = select_frames(
        hours,
        stride=selection.stride,
        hour_window=selection.hour_window,
        max_per_stack=selection.max_per_stack,
        candidates=keep,
    )
    return SampleIndex(
        stack=np.full(len(idx), stack_no, dtype=np.int32),
        frame=idx.astype(np.int32),
        hours=hours[idx].astype(np.float32),
        infected=label[idx],
        time_target=target[idx].astype(np.float32),
    )


def probe_records(records: Sequence[StackRecord]) -> list[StackInfo]:
    """Probe every stack (shape, dtype, integrity); every failure is named, by stack, in one error."""
    infos: list[StackInfo] = []
    errors: list[str] = []
    for rec in records:
        try:
            infos.append(probe_stack(rec.path))
        except BadInputError as exc:
            errors.append(f"stack_id {rec.stack_id}: {exc}")
    if errors:
        raise all_culprits(errors, "stacks that cannot be read")
    return infos


def with_file_times(records: Sequence[StackRecord], infos: Sequence[StackInfo]) -> list[StackRecord]:
    """Each stack's frame times by SPEC section 1's precedence: the manifest's (or the command line's)
    interval, then the file's own metadata, then the config's. Where the manifest and the file disagree by
    more than 1 %, the manifest wins and a WARNING names the stack and both values. Irregular file times
    (OME DeltaT) are kept per frame unless the manifest sets an interval."""
    out = []
    for rec, info in zip(records, infos, strict=True):
        times = info.file_times
        if times is None:
            out.append(rec)
        elif rec.interval_source in (FROM_CONFIG,):
            out.append(replace(rec, frame_interval_hours=times.interval_hours, interval_source=FROM_FILE,
                               frame_hours=times.frame_hours))
        else:
            if abs(rec.frame_interval_hours - times.interval_hours) > 0.01 * times.interval_hours:
                log.warning("stack_id %s: frame_interval_hours %g h from the %s, but the file's %s says %g h; "
                            "using %g h", rec.stack_id, rec.frame_interval_hours, rec.interval_source,
                            times.source, times.interval_hours, rec.frame_interval_hours)
            out.append(rec)
    return out


@dataclass
class Experiment:
    """All stacks of a config, probed, with their split. `channels` is the resolved channel selection, as
    indices into the first stack's channels; `channel_names` their names when the manifest or the files'
    OME metadata name them."""

    records: list[StackRecord]
    infos: list[StackInfo]
    splits: dict[str, str]
    channels: list[int]
    channel_names: list[str] | None = None

    def split_records(self, split: str) -> list[int]:
        return [i for i, r in enumerate(self.records) if self.splits.get(r.stack_id) == split]

    def index(
        self, split: str, selection: FrameSelection, pre_onset: str, uninfected_time: str = "elapsed"
    ) -> SampleIndex:
        parts = [
            stack_index(self.records[i], self.infos[i], i, selection, pre_onset, uninfected_time)
            for i in self.split_records(split)
        ]
        return SampleIndex.concat(parts)


def load_records(cfg: Config, *, labelled: bool = True) -> list[StackRecord]:
    d = cfg.data
    onset = cfg.multitask.infection_onset_hour
    if d.manifest is not None:
        return load_manifest(
            d.manifest, default_interval=d.frame_interval_hours, default_onset=onset, labelled=labelled
        )
    assert d.infected_dir is not None and d.uninfected_dir is not None  # guaranteed by DataConfig
    return records_from_dirs(
        d.infected_dir, d.uninfected_dir, default_interval=d.frame_interval_hours, default_onset=onset
    )


def load_experiment(cfg: Config, splits: dict[str, str] | None = None,
                    trained: TrainedChannels | None = None) -> Experiment:
    """Manifest (or folders) -> probed stacks -> splits (`splits` given: a resumed run's own). With a run's
    network's `trained` channels (from its checkpoint), the stacks are read with those, not re-resolved from today's
    manifest. Every problem is a BadInputError."""
    records = load_records(cfg)
    d = cfg.data
    if splits is not None:
        known = {r.stack_id for r in records}
        missing = sorted(set(splits) - known)
        if missing:
            raise BadInputError(f"the run's stack {missing[0]!r} is no longer in the manifest")
    splits = splits or assign_splits(
        records,
        train_stacks=d.train_stacks,
        val_stacks=d.val_stacks,
        test_stacks=d.test_stacks,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        seed=cfg.seed,
        need_both_classes=cfg.task.mode != "regression",
    )
    probed = probe_records(records)
    records = with_file_times(records, probed)
    infos, channels, names = (match_channels(records, probed, d.channels) if trained is None
                              else checkpoint_channels(records, probed, trained))
    return Experiment(records, infos, splits, channels, names)


def sample_pixels(
    readers: Sequence[StackReader],
    index: SampleIndex,
    channels: Sequence[int],
    *,
    n_frames: int,
    rng: np.random.Generator,
    pixels_per_frame: int = 20000,
) -> list[np.ndarray]:
    """`[C, N]` random pixel samples from up to `n_frames` frames of `index`, for dataset percentiles."""
    if len(index) == 0:
        return []
    picks = rng.choice(len(index), size=min(n_frames, len(index)), replace=False)
    out = []
    for i in np.sort(picks):
        img = readers[int(index.stack[i])].read(int(index.frame[i]), channels)
        flat = img.reshape(img.shape[0], -1)
        take = rng.choice(flat.shape[1], size=min(pixels_per_frame, flat.shape[1]), replace=False)
        out.append(flat[:, take])
    return out


def build_normalizer(cfg: Config, exp: Experiment, train_index: SampleIndex) -> Normalizer:
    n = cfg.data.normalization
    samples: list[np.ndarray] = []
    if n.mode == "dataset" or n.range_floor > 0:
        readers = [StackReader(info) for info in exp.infos]
        rng = np.random.default_rng(cfg.seed)
        samples = sample_pixels(readers, train_index, exp.channels, n_frames=n.sample_frames, rng=rng)
        for r in readers:
            r.close()
    return fit_normalizer(n.mode, n.percentiles, samples, n.range_floor)


def context_offsets(context_hours: Sequence[float], frame_interval_hours: float) -> list[int]:
    """Hour offsets -> frame offsets (rounded to the nearest frame), e.g. [-6, -3, 0] h at 1.5 h -> [-4, -2, 0]."""
    return [int(round(h / frame_interval_hours)) for h in context_hours]


def context_frames(frame: int, offsets: Sequence[int], n_frames: int) -> list[int]:
    """Frame numbers for one sample's temporal context, clamped to the stack (before its first frame the
    first frame is repeated, after its last the last)."""
    return [min(max(frame + o, 0), n_frames - 1) for o in offsets]


class TimeCourseDataset(Dataset):
    """Per-frame samples: dict with `image` float32 `[C, H, W]`, `infected` (float 0/1, -1 unknown),
    `time_h` (hours, NaN unknown), `has_time`, and metadata `stack_id`, `frame`, `hours_since_start`.

    Keys may be an int, or `(int, epoch)` from `EpochSampler` so augmentation differs per epoch yet is
    reproducible whatever the number of workers: each sample's generator is seeded from
    (seed, epoch, index).

    With `tiles` (`cellmtl.data.tiles`) frames keep their native resolution (after `tiles.downsample`): with
    `random_tiles` (training) a sample is one random tile `[C, size, size]` (give an index repeated
    `tiles.per_frame` times, `SampleIndex.repeat`); otherwise a sample is every tile of the frame's grid,
    `image` `[K, C, size, size]` with `grid` (rows, cols), and the engine makes one prediction of them.
    """

    def __init__(
        self,
        infos: Sequence[StackInfo],
        stack_ids: Sequence[str],
        index: SampleIndex,
        *,
        channels: Sequence[int],
        image_size: int,
        normalizer: Normalizer,
        augment_cfg: AugmentConfig | None = None,
        seed: int = 0,
        context_hours: Sequence[float] | None = None,
        intervals: Sequence[float] | None = None,
        tiles: TileSpec | None = None,
        random_tiles: bool = False,
    ) -> None:
        self.readers = [StackReader(info) for info in infos]
        self.stack_ids = list(stack_ids)
        self.index = index
        self.channels = list(channels)
        self.image_size = image_size
        self.normalizer = normalizer
        self.augment_cfg = augment_cfg
        self.seed = seed
        self.tiles, self.random_tiles = tiles, random_tiles
        # data.temporal_context_hours as frame offsets per stack (each stack has its own frame interval)
        self.frame_offsets: list[list[int]] | None = None
        if context_hours:
            if intervals is None or len(intervals) != len(infos):
                raise ValueError("temporal context needs one frame interval per stack")
            self.frame_offsets = [context_offsets(context_hours, dt) for dt in intervals]
        self.cache: torch.Tensor | list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def cache_bytes(self) -> int:
        if self.cache is None:
            return 0
        parts = self.cache if isinstance(self.cache, list) else [self.cache]
        return sum(t.numel() * t.element_size() for t in parts)

    def tiles_per_sample(self) -> int:
        """Tiles in the largest sample (1 without tiles or with random training tiles): loaders batch fewer
        frames when each brings many tiles."""
        if self.tiles is None or self.random_tiles:
            return 1
        rows, cols = max((grid_shape(r.info.height, r.info.width, self.tiles) for r in self.readers),
                         key=lambda g: g[0] * g[1])
        return rows * cols

    def fill_cache(self) -> None:
        """Read, resize and normalise every frame once into one float32 `[N, C', S, S]` tensor (`data.cache:
        memory`; C' includes temporal-context frames): the per-sample work left is augmentation. Filled in
        the main process before DataLoader workers fork, so on Linux they share its pages instead of each
        building a copy."""
        if len(self) == 0:
            return
        if self.tiles is not None:  # native-resolution fields differ in size between stacks: one tensor each
            seen: dict[tuple[int, int], torch.Tensor] = {}
            keys = list(zip(self.index.stack.tolist(), self.index.frame.tolist(), strict=True))
            self.cache = [seen.setdefault(k, self.load_image(i)) for i, k in enumerate(keys)]
            return
        first = self.load_image(0)
        cache = torch.empty((len(self), *first.shape), dtype=torch.float32)
        cache[0] = first
        for i in range(1, len(self)):
            cache[i] = self.load_image(i)
        self.cache = cache

    def load_image(self, i: int) -> torch.Tensor:
        """Read, resize (or, with tiles, downsample) and normalise frame i of the index: float32
        `[C, image_size, image_size]`, or the whole field `[C, H / downsample, W / downsample]` with tiles."""
        if self.cache is not None:
            return self.cache[i]  # a view; augmentation and collation copy, nothing writes into it
        s, f = int(self.index.stack[i]), int(self.index.frame[i])
        frames = [f] if self.frame_offsets is None else context_frames(f, self.frame_offsets[s],
                                                                      self.readers[s].info.n_frames)
        # each frame normalised on its own, then stacked: [len(offsets) * C, H, W], oldest offset first
        parts = [self.normalizer(self._fit(torch.from_numpy(self.readers[s].read(t, self.channels))))
                 for t in frames]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def _fit(self, img: torch.Tensor) -> torch.Tensor:
        """The frame at the model's scale: resized to image_size, or block-averaged for tiles (per-image
        normalisation then sees the whole field, so a tile of background stays dark)."""
        return resize(img, self.image_size) if self.tiles is None else downsample(img, self.tiles.downsample)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, epoch = (key, 0) if isinstance(key, int | np.integer) else key
        i = int(i)
        img = self.load_image(i)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
        extra: dict = {}
        if self.tiles is not None and self.random_tiles:
            img = random_tile(img, self.tiles, gen)
        elif self.tiles is not None:
            img, extra["grid"] = grid_tiles(img, self.tiles)
        if self.augment_cfg is not None:
            img = augment(img, self.augment_cfg, gen)
        t = float(self.index.time_target[i])
        return {
            **extra,
            "image": img.float(),
            "infected": torch.tensor(float(self.index.infected[i])),
            "time_h": torch.tensor(t, dtype=torch.float32),
            "has_time": torch.tensor(bool(np.isfinite(t))),
            "stack_id": self.stack_ids[int(self.index.stack[i])],
            "frame": int(self.index.frame[i]),
            "hours_since_start": float(self.index.hours[i]),
        }


def class_weights(infected: np.ndarray) -> tuple[float, float]:
    """(uninfected, infected) weights inverse to class frequency, `n / (2 * n_class)`: 1.0 each when the
    classes are balanced, and each class then contributes half of the total weight. A missing class gets
    1.0 (nothing to rebalance against)."""
    labels = np.asarray(infected)
    n0, n1 = int((labels == 0).sum()), int((labels == 1).sum())
    if n0 == 0 or n1 == 0:
        return 1.0, 1.0
    n = n0 + n1
    return n / (2 * n0), n / (2 * n1)


def balanced_sample_weights(infected: np.ndarray) -> np.ndarray:
    """float64 [N] draw probabilities that give both classes the same total mass (unknown labels: 0)."""
    labels = np.asarray(infected)
    w0, w1 = class_weights(labels)
    w = np.where(labels == 1, w1, np.where(labels == 0, w0, 0.0)).astype(np.float64)
    return w / w.sum() if w.sum() > 0 else np.full(len(labels), 1.0 / max(len(labels), 1))


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled (or sequential) indices paired with the epoch, so per-sample augmentation is seeded
    by (seed, epoch, index) rather than by worker-local global RNG state.

    With `weights` (draw probabilities, [n]) each epoch draws n indices with replacement from them: the
    class-balanced sampling of `data.balance: sampler`, where minority-class frames recur within an epoch
    (each with its own augmentation, since the key holds the epoch)."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, weights: np.ndarray | None = None) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = range(self.n)
        return iter([(i, self.epoch) for i in order])

    def __len__(self) -> int:
        return self.n
