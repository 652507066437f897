"""DDP on CPU: two processes under torchrun (gloo) train one run, write one folder, score the whole val set."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from cellmtl.data.dataset import EpochSampler
from cellmtl.distributed import DistContext, ShardedSampler, shard_indices
from cellmtl.evaluation.evaluate import evaluate_run
from tests.conftest import write_config, write_hyperstack

pytestmark = pytest.mark.slow


def test_sharded_sampler_covers_the_epoch_disjointly():
    base = EpochSampler(11, shuffle=True, seed=3)
    shards = []
    for rank in range(3):
        s = ShardedSampler(base, DistContext(rank, 3, rank))
        s.set_epoch(5)
        shards.append(list(s))
    assert [len(x) for x in shards] == [4, 4, 4]  # equal steps on every rank
    flat = [i for shard in shards for i, _ in shard]
    assert sorted(set(flat)) == list(range(11)) and len(flat) == 12  # one wrapped-around repeat
    assert all(epoch == 5 for shard in shards for _, epoch in shard)
    base.set_epoch(5)
    order = [i for i, _ in base]
    assert [i for i, _ in shards[1]] == order[1::3]  # the same epoch's order, sliced
    assert sorted(np.concatenate([shard_indices(7, DistContext(r, 2, r)) for r in range(2)])) == list(range(7))


def torchrun(*args: str, command: str = "train") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cellmtl", command, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def only_run(outputs: Path) -> Path:
    """The one run folder under `outputs` (rank 1 creates nothing)."""
    runs = list(outputs.iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def assert_logged_val_is_best_pt_on_the_whole_val_split(run: Path) -> None:
    """Val metrics gathered over both ranks == one process scoring best.pt on the whole val split."""
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped model
    ev = json.loads(evaluate_run(run, checkpoint="best", split="val").read_text())
    best = rows[ckpt["epoch"] - 1]  # best.pt is the best epoch's checkpoint
    n_val = sum(1 for _ in csv.DictReader((run / "predictions_val.csv").open()))
    assert ev["n_frames"] == n_val
    for k, v in ev["metrics"].items():
        logged = best[f"val_{k}"]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            assert logged in ("", "nan"), k
        else:
            assert float(logged) == pytest.approx(v, rel=1e-5, abs=1e-6), k


def name_channels_with_one_swapped(manifest: Path) -> None:
    """Give every stack channel names A|B and store s1's channels the other way round (B|A), so loading logs
    the 'matched by name' INFO line."""
    lines = manifest.read_text().splitlines()
    lines = [lines[0] + ",channels"] + [ln + (",B|A" if ln.startswith("s1,") else ",A|B") for ln in lines[1:]]
    manifest.write_text("\n".join(lines) + "\n")
    path = manifest.parent / "stacks" / "s1.tif"
    write_hyperstack(path, tifffile.imread(path)[:, ::-1].copy())


def test_torchrun_two_cpu_processes(tiny_config, tiny_experiment, tmp_path):
    name_channels_with_one_swapped(tiny_experiment)
    proc = torchrun("--config", str(tiny_config), "--set", "training.epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("matched by name") == 1, proc.stderr[-3000:]  # rank 1's module loggers are quiet
    run = only_run(tmp_path / "outputs" / "t")
    assert proc.stdout.strip().splitlines() == [str(run)]  # one line, from rank 0
    with (run / "metrics.csv").open() as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2"]
    assert (run / "train.log").read_text().count("Epoch 2/2") == 1
    assert_logged_val_is_best_pt_on_the_whole_val_split(run)

    # Resume under DDP: same folder, one more row.
    again = torchrun("--resume", str(run), "--set", "training.epochs=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(list((tmp_path / "outputs" / "t").iterdir())) == 1
    with (run / "metrics.csv").open() as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2", "3"]


def test_gather_predictions_keeps_every_output(monkeypatch):
    """Two ranks' shards are reassembled in split order, including time_std and the `extra` outputs that
    scoring needs (gaussian_nll's log-variance, per_class's [B, 2] times)."""
    from cellmtl import distributed
    from cellmtl.engine import Predictions

    def shard(pos):
        v = pos.astype(np.float32)
        return Predictions(n=len(pos), prob=v / 10, logit=v, time_pred=v + 1, time_pred_scaled=v + 2, time_std=v + 3,
                           extra={"time_logvar": v + 4, "time_per_class": np.stack([v, -v], axis=1)})

    p0, p1 = np.array([0, 2, 4]), np.array([1, 3])
    monkeypatch.setattr(distributed, "gather_objects", lambda obj, ctx: [(p0, shard(p0)), (p1, shard(p1))])
    got = distributed.gather_predictions(shard(p0), p0, 5, distributed.SINGLE)
    full = np.arange(5, dtype=np.float32)
    for name, want in (("prob", full / 10), ("logit", full), ("time_pred", full + 1), ("time_pred_scaled", full + 2),
                       ("time_std", full + 3)):
        np.testing.assert_array_equal(getattr(got, name), want)
    np.testing.assert_array_equal(got.extra["time_logvar"], full + 4)
    np.testing.assert_array_equal(got.extra["time_per_class"], np.stack([full, -full], axis=1))


GRADNORM_RANKS = """
import functools, json, sys
import torch
import yaml
from cellmtl import distributed
from cellmtl.weighting import GradNormWeighting

ctx = distributed.init("cpu")
out = {}
for synced in (False, True):
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(4, 3))
    mean = functools.partial(distributed.mean_over_ranks, ctx=ctx) if synced else None
    gn = GradNormWeighting(1.5, 0.05, rank_mean=mean)
    gn.shared = shared  # the model's last shared layer, as combine() finds it
    gen = torch.Generator().manual_seed(100 + ctx.rank)  # each rank its own batches
    for step in range(5):
        x, y = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
        if synced and step == 2 and ctx.rank == 1:
            x[0, 0] = float("nan")  # one rank's bad batch: both must skip the step, not hang or diverge
        gn.combine({"cls": (shared * x).sum() ** 2, "reg": (shared * y).abs().sum() * 3}, None)
    out[str(synced)] = distributed.gather_objects([*gn.wp.detach().tolist(), gn.opt.state[gn.wp]["step"].item()],
                                                  ctx)
if ctx.is_main:
    json.dump(out, open(sys.argv[1], "w"))
distributed.shutdown()
"""


def test_gradnorm_weights_stay_equal_across_ranks(tmp_path):
    """GradNorm steps its weights with its own optimizer on each rank's batch; averaged inputs keep the two
    ranks' weights identical (without them they drift apart, which the test also checks), and a NaN loss on
    one rank makes both skip the step instead of one waiting forever in a collective."""
    script, result = tmp_path / "gradnorm_ranks.py", tmp_path / "wp.json"
    script.write_text(GRADNORM_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(result)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(result.read_text())
    (a0, a1), (b0, b1) = got["False"], got["True"]
    assert not np.allclose(a0[:2], a1[:2], atol=1e-6), "unsynced ranks should drift apart on different batches"
    np.testing.assert_array_equal(b0, b1)
    assert abs(b0[0] + b0[1] - 2.0) < 1e-5 and b0[0] != b0[1]  # renormalised to N_TASKS, and actually moved
    assert a0[2] == 5 and b0[2] == 4  # rank 1's NaN batch at step 3: both ranks skipped that one step


def assert_predict_under_torchrun_writes_the_same_tables_as_one_process(run: Path, manifest: Path,
                                                                        tmp_path: Path) -> None:
    from cellmtl.cli import main

    args = ["--checkpoint", str(run / "checkpoints" / "best.pt"), "--manifest", str(manifest)]
    assert main(["predict", *args, "--out", str(tmp_path / "one.csv")]) == 0
    done = torchrun(*args, "--device", "cpu", "--out", str(tmp_path / "two.csv"), command="predict")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines() == [str(tmp_path / "two.csv")]  # one line, from rank 0
    for name in ("{}.csv", "{}.stacks.csv"):
        with (tmp_path / name.format("one")).open() as fh:
            one = list(csv.DictReader(fh))
        with (tmp_path / name.format("two")).open() as fh:
            two = list(csv.DictReader(fh))
        assert len(one) == len(two) > 0 and one[0].keys() == two[0].keys()
        for a, b in zip(one, two, strict=True):
            for key, value in a.items():
                if key in ("prob_infected", "pred_time_hours", "est_onset_hour", "onset_fit_slope"):
                    assert (value == b[key] == "") or math.isclose(float(value), float(b[key]), abs_tol=1e-4)
                else:
                    assert value == b[key], (key, value, b[key])


def test_predict_under_torchrun_writes_the_same_tables_as_one_process(tiny_config, tiny_experiment, tmp_path):
    from cellmtl.cli import main

    assert main(["train", "--config", str(tiny_config), "--set", "training.epochs=1"]) == 0
    run = sorted((tiny_config.parent / "outputs" / "t").iterdir())[-1]
    assert_predict_under_torchrun_writes_the_same_tables_as_one_process(run, tiny_experiment, tmp_path)


def test_tiles_under_torchrun_train_and_predict_as_one_process(tiny_experiment, tmp_path):
    """With data.tile_size, each rank validates whole frames' tile grids (make_loader batches by grid through the
    rank's Subset): the logged val metrics are best.pt's on the whole split, and torchrun predict's tables are
    one process's."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_experiment, data={"tile_size": 16, "tiles_per_frame": 2})
    proc = torchrun("--config", str(cfg), "--set", "training.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path / "outputs" / "t")
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["tile_size"] == 16
    assert_logged_val_is_best_pt_on_the_whole_val_split(run)
    assert_predict_under_torchrun_writes_the_same_tables_as_one_process(run, tiny_experiment, tmp_path)


def test_probe_under_torchrun_fits_the_heads_one_process_fits(tiny_experiment, tmp_path):
    """training.strategy probe under DDP: every rank fits the same closed-form heads on all training frames, and
    rank 0's best.pt is the one-process run's, weight for weight."""
    from cellmtl.cli import main

    cfg = write_config(tmp_path / "cfg.yaml", tiny_experiment, training={"strategy": "probe"},
                       model={"head_hidden": 0})
    proc = torchrun("--config", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = only_run(tmp_path / "outputs" / "t")
    assert main(["train", "--config", str(cfg), "--set", "output_dir=" + str(tmp_path / "one")]) == 0
    one = only_run(tmp_path / "one" / "t")
    a = torch.load(one / "checkpoints" / "best.pt", weights_only=True)["model"]
    b = torch.load(two / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert_logged_val_is_best_pt_on_the_whole_val_split(two)
