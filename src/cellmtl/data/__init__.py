"""Manifest, targets, frame selection, splits, transforms and the Dataset."""

from cellmtl.data.dataset import (
    EpochSampler,
    Experiment,
    SampleIndex,
    TimeCourseDataset,
    build_normalizer,
    load_experiment,
    load_records,
)
from cellmtl.data.manifest import StackRecord, load_manifest, records_from_dirs
from cellmtl.data.splits import assign_splits
from cellmtl.data.targets import hours_since_start, select_frames, time_targets
from cellmtl.data.transforms import Normalizer

__all__ = [
    "EpochSampler",
    "Experiment",
    "Normalizer",
    "SampleIndex",
    "StackRecord",
    "TimeCourseDataset",
    "assign_splits",
    "build_normalizer",
    "hours_since_start",
    "load_experiment",
    "load_manifest",
    "load_records",
    "records_from_dirs",
    "select_frames",
    "time_targets",
]
