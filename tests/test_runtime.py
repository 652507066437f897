"""The CPU thread policy (docs/PERFORMANCE.md, "CPU threads")."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import Dataset, Subset

from cellmtl.runtime import cpu_threads, make_loader


def test_default_threads_use_every_allowed_core_and_share_them_among_local_processes(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert cpu_threads(None) == 6  # DataLoader workers do not take cores from the model any more
    assert cpu_threads(None, processes=2) == 3
    assert cpu_threads(None, processes=4) == 1
    assert cpu_threads(None, processes=8) == 1  # never zero


@pytest.mark.parametrize("n", [1, 3])
def test_an_explicit_num_threads_wins(monkeypatch, n):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cpu_threads(n, processes=2) == n


class _Grids(Dataset):
    """Ten frames of a 2 x 3 tile grid each, as TimeCourseDataset's whole-grid samples are."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.zeros(6, 1, 4, 4)}

    def tiles_per_sample(self) -> int:
        return 6


def test_grid_samples_are_batched_by_tiles_also_through_a_rank_subset():
    """DDP validation and predict under torchrun hand make_loader a Subset (a rank's shard): its batches must
    still hold about batch_size tiles, not batch_size whole grids."""
    cpu = torch.device("cpu")
    whole = make_loader(_Grids(), batch_size=12, num_workers=0, device=cpu)
    shard = make_loader(Subset(Subset(_Grids(), range(0, 10, 2)), [0, 1, 2]), batch_size=12, num_workers=0,
                        device=cpu)
    assert whole.batch_size == shard.batch_size == 2
    assert [b["image"].shape[:2] for b in shard] == [(2, 6), (1, 6)]
