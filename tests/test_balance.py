"""data.balance: class-balanced sampling and class-weighted loss, against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from cellmtl.config import load_config
from cellmtl.data.dataset import EpochSampler, balanced_sample_weights, class_weights
from cellmtl.losses import MultiTaskLoss
from cellmtl.training.loop import train_sampler
from cellmtl.training.rundir import close_logger
from cellmtl.training.state import setup
from tests.conftest import write_config


def test_class_weights_by_hand():
    assert class_weights(np.array([0, 0, 0, 1])) == pytest.approx((4 / 6, 2.0))
    assert class_weights(np.array([0, 1])) == (1.0, 1.0)
    assert class_weights(np.array([1, 1])) == (1.0, 1.0)  # one class: nothing to rebalance
    w = balanced_sample_weights(np.array([0, 0, 0, 1, -1]))
    assert w.sum() == pytest.approx(1.0) and w[4] == 0 and w[3] == pytest.approx(0.5)


def test_weighted_loss_matches_hand_computation():
    logits = [2.0, -1.0, 0.5, -0.3]
    labels = [1.0, 0.0, 0.0, 0.0]
    weights = (4 / 6, 2.0)

    def bce(z: float, y: float) -> float:
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    expected = sum(weights[int(y)] * bce(z, y) for z, y in zip(logits, labels, strict=True)) / 4
    out = {"infected": torch.tensor(logits)}
    args = (torch.tensor(labels), torch.zeros(4), torch.zeros(4, dtype=torch.bool))
    got = MultiTaskLoss(class_weights=weights)(out, *args)["cls"]
    plain = MultiTaskLoss()(out, *args)["cls"]
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(plain) == pytest.approx(sum(bce(z, y) for z, y in zip(logits, labels, strict=True)) / 4, rel=1e-6)


@pytest.mark.parametrize("balance", ["none", "sampler", "weights"])
def test_balance_on_imbalanced_experiment(tmp_path, tiny_experiment, balance):
    # 1 infected and 3 mock stacks train: a 1:3 imbalance
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_experiment,
                            data={"train_stacks": ["s0", "s1", "s3", "s5"], "val_stacks": ["s2", "s7"],
                                  "balance": balance})
    s = setup(load_config(cfg_path))
    try:
        labels = s.train_ds.index.infected
        assert 0.15 < labels.mean() < 0.35
        sampler = train_sampler(s)
        drawn = []
        for epoch in range(1, 6):
            sampler.set_epoch(epoch)
            drawn += [labels[i] for i, _ in sampler]
        share = float(np.mean(drawn))
        if balance == "sampler":
            assert len(drawn) == 5 * len(labels) and 0.4 < share < 0.6
        else:
            assert share == pytest.approx(labels.mean())  # a permutation per epoch
        expected = class_weights(labels) if balance == "weights" else None
        assert s.loss_fn.class_weights == expected
    finally:
        close_logger(s.logger)


def test_sampler_is_deterministic_per_epoch():
    w = balanced_sample_weights(np.array([0] * 9 + [1]))
    a, b = EpochSampler(10, shuffle=True, seed=3, weights=w), EpochSampler(10, shuffle=True, seed=3, weights=w)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)
