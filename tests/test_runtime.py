"""The CPU thread policy (docs/PERFORMANCE.md, "CPU threads")."""

from __future__ import annotations

import os

import pytest

from cellmtl.runtime import cpu_threads


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
