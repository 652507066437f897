"""Crash safety: atomic checkpoints under SIGKILL, non-finite losses, exact resume, flat memory."""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from cellmtl.config import load_config
from cellmtl.errors import TrainingError
from cellmtl.fileio import atomic_write
from cellmtl.runtime import make_loader
from cellmtl.training import loop
from cellmtl.training.run import train
from cellmtl.training.rundir import close_logger
from cellmtl.training.state import setup


def _save_forever(path: str, i: int) -> None:
    """Child: save ever-new checkpoints (a few MiB, so a save takes a while), numbered from i + 1, until killed,
    the way `Checkpoint.save` writes them."""
    while True:
        i += 1
        data = {"model": {"w": torch.full((600_000,), float(i))}, "model_spec": {}, "i": i}
        atomic_write(Path(path), lambda fh, data=data: torch.save(data, fh), durable=True)


def test_kill_during_save_always_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    rnd = random.Random(0)
    ctx = mp.get_context("fork")  # no re-import of torch per child: 20 kills in a few seconds
    last_seen = 0
    for _ in range(20):
        child = ctx.Process(target=_save_forever, args=(str(path), last_seen))
        child.start()
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rnd.uniform(0.0, 0.15))  # somewhere inside a later save: write, fsync, link or rename
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        raw = torch.load(path, weights_only=True)  # the file itself is never torn
        assert raw["i"] >= 1 and bool((raw["model"]["w"] == raw["i"]).all())
        assert raw["i"] >= last_seen
        last_seen = raw["i"]
    # a killed save leaves only its hidden temp file, which the next save of the same file replaces
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == ["last.pt"]


def small_cfg(tiny_config: Path, *overrides: str):
    return load_config(tiny_config, ["training.bn_recalibration_samples=16", *overrides])


@pytest.mark.slow
def test_non_finite_loss_never_updates_weights_and_stops_the_run(tiny_config, tmp_path, monkeypatch):
    s = setup(small_cfg(tiny_config, "training.batch_size=4", "training.epochs=1"))
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    opt_before = len(s.optimizer.state)

    real_loss = s.loss_fn

    def nan_loss(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        return {k: v * float("nan") for k, v in out.items()}

    monkeypatch.setattr(s, "loss_fn", nan_loss)
    with pytest.raises(TrainingError) as err:
        loop.fit(s)
    close_logger(s.logger)
    msg = str(err.value)
    steps = loop.MAX_BAD_STEPS
    assert f"{steps} non-finite loss values in a row at epoch 1, step {steps - 1}; stacks in the last batch: s" in msg
    after = s.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert len(s.optimizer.state) == opt_before == 0
    assert not list(s.run_dir.glob("checkpoints/*.pt"))  # nothing checkpointed


@pytest.mark.slow
def test_one_nan_input_is_skipped_and_training_goes_on(tiny_config, monkeypatch):
    s = setup(small_cfg(tiny_config, "training.epochs=1"))
    load = s.train_ds.load_image
    poisoned = int(len(s.train_ds) // 2)

    def load_image(i: int) -> torch.Tensor:
        img = load(i)
        return img * float("nan") if i == poisoned else img

    monkeypatch.setattr(s.train_ds, "load_image", load_image)
    before = [p.detach().clone() for p in s.model.parameters()]
    loader = make_loader(s.train_ds, batch_size=8, num_workers=0, device=s.device)
    loop.train_one_epoch(s, loader, 1)
    loop.check_finite_weights(s, 1)  # what fit() runs before every checkpoint
    close_logger(s.logger)
    assert "non-finite loss at epoch 1 step" in (s.run_dir / "train.log").read_text()
    assert any(not torch.equal(a, b) for a, b in zip(before, s.model.parameters(), strict=True))  # others trained
    for p in s.model.parameters():
        p.data[0] = float("nan") if p.dim() == 1 else p.data[0]
    with pytest.raises(TrainingError, match="non-finite weights after epoch 2"):
        loop.check_finite_weights(s, 2)


class Crash(Exception):
    pass


def read_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as fh:
        return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "rss_mib")} for r in csv.DictReader(fh)]


@pytest.mark.slow
def test_resume_is_exact_and_memory_stays_flat(tiny_config, monkeypatch):
    monkeypatch.setattr(loop, "write_run_plots", lambda *args, **kwargs: None)  # not under test; slow
    n, k = 6, 4
    full = train(small_cfg(tiny_config, f"training.epochs={n}"))
    with (full / "metrics.csv").open() as fh:
        rss = [float(r["rss_mib"]) for r in csv.DictReader(fh)]
    assert rss[5] <= 1.10 * rss[1], f"RSS grew from {rss[1]} MiB (epoch 2) to {rss[5]} MiB (epoch 6)"

    write = loop.write_metrics_csv

    def crash_after_k(history, path):
        write(history, path)
        if len(history) == k:
            raise Crash  # as if killed right after epoch k's checkpoint

    with monkeypatch.context() as m:
        m.setattr(loop, "write_metrics_csv", crash_after_k)
        with pytest.raises(Crash):
            train(small_cfg(tiny_config, f"training.epochs={n}"))
    runs = sorted(full.parent.iterdir())
    interrupted = runs[-1]
    assert interrupted != full and len(read_rows(interrupted)) == k
    assert train(None, resume=interrupted) == interrupted
    assert read_rows(interrupted) == read_rows(full)  # identical losses and metrics, epoch by epoch
