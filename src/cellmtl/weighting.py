"""How the classification and time losses are combined: `multitask.weighting`. The one place losses combine.

The validation (and test) `total_loss` is always `fixed_weights(cfg)` applied to the unweighted task losses
(`classification_weight * cls + regression_weight * reg`, the absent task's weight 0), whatever the weighting:
the adaptive weights below move during training, and a total that changes its own scale from epoch to epoch
would not compare across epochs (selection by `total_loss`, early stopping, the learning curves).

* `fixed`: `classification_weight * L_cls + regression_weight * L_reg` (the seed's alpha/beta).
* `uncertainty` (Kendall et al. 2018), one classification and one regression task:
  `exp(-s_c) * L_cls + 0.5 * exp(-s_r) * L_reg + 0.5 * (s_c + s_r)`, the log-variances `s` learned by the
  main optimizer (no weight decay). Effective weights `exp(-s_c)` and `0.5 * exp(-s_r)`.
* `dwa` (Liu et al. 2019): per epoch, `w_k = K * softmax_k(r_k / T)` with `r_k = L_k(t-1) / L_k(t-2)` the
  ratio of the last two epochs' mean training losses, T = `dwa_temperature` (2), K = 2 tasks; weights
  1 for the first two epochs. A task whose loss stalls gets more weight.
* `gradnorm` (Chen et al. 2018): weights `w_k` learned so that the gradient norms `||d(w_k L_k)/dW||` on
  the last shared layer W (the backbone's last convolution) move towards `mean_k(G) * r_k^alpha`, with
  `r_k` the task's relative inverse training rate `(L_k / L_k(0)) / mean(L / L(0))`, alpha =
  `gradnorm_alpha` (1.5); after each update the weights are renormalised to sum to K.

Published comparisons (Kurin et al. 2022; Xin et al. 2022, both NeurIPS) find that tuned fixed weights are
hard to beat: the adaptive schemes are conveniences, not guaranteed gains.

The science is in pure functions (`kendall_total`, `dwa_weights`, `gradnorm_targets`), tested by hand;
the classes hold the state that a checkpoint saves and `--resume` restores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from cellmtl.config import Config

N_TASKS = 2


def fixed_weights(cfg: Config) -> tuple[float, float]:
    """(classification, regression) weights of the config: the fixed weighting's, and the validation total's.
    A single-task mode weighs the task it lacks 0."""
    m, mode = cfg.multitask, cfg.task.mode
    return (m.classification_weight if mode != "regression" else 0.0,
            m.regression_weight if mode != "classification" else 0.0)


def weighted_total(losses: dict[str, torch.Tensor], w_cls: float, w_reg: float) -> torch.Tensor:
    """`w_cls * cls + w_reg * reg` (scalar tensors)."""
    return w_cls * losses["cls"] + w_reg * losses["reg"]


def kendall_total(cls: torch.Tensor, reg: torch.Tensor, s_c: torch.Tensor, s_r: torch.Tensor) -> torch.Tensor:
    """`exp(-s_c) * cls + 0.5 * exp(-s_r) * reg + 0.5 * (s_c + s_r)` (scalars)."""
    return torch.exp(-s_c) * cls + 0.5 * torch.exp(-s_r) * reg + 0.5 * (s_c + s_r)


def dwa_weights(history: Sequence[Sequence[float]], temperature: float = 2.0) -> list[float]:
    """DWA weights for the next epoch from per-epoch mean training losses `[(L_cls, L_reg), ...]`
    (oldest first). Fewer than two epochs: all ones."""
    if len(history) < 2:
        return [1.0] * N_TASKS
    prev, prev2 = history[-1], history[-2]
    ratios = [a / b if b > 0 else 1.0 for a, b in zip(prev, prev2, strict=True)]
    exps = [math.exp(r / temperature) for r in ratios]
    return [len(exps) * e / sum(exps) for e in exps]


def gradnorm_targets(
    grad_norms: torch.Tensor, losses: torch.Tensor, initial: torch.Tensor, alpha: float
) -> torch.Tensor:
    """GradNorm's target gradient norms `mean(G) * r^alpha`, `r = (L / L0) / mean(L / L0)` ([K], detached)."""
    ratio = losses.detach() / initial.clamp(min=1e-12)
    r = ratio / ratio.mean().clamp(min=1e-12)
    return (grad_norms.detach().mean() * r**alpha).detach()


class FixedWeighting:
    """The configured constant weights; the base of the adaptive schemes' interface."""

    name = "fixed"

    def __init__(self, w_cls: float = 1.0, w_reg: float = 1.0) -> None:
        self.w = [float(w_cls), float(w_reg)]

    def parameters(self) -> list[nn.Parameter]:
        """Parameters the main optimizer must train (uncertainty's log-variances)."""
        return []

    def combine(self, losses: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        """The total to back-propagate for one training step from the task losses `cls` and `reg`."""
        return weighted_total(losses, *self.w)

    def end_epoch(self, train_cls: float, train_reg: float) -> None:
        """Called with the epoch's mean (unweighted) training losses."""

    def weights(self) -> dict[str, float]:
        """The effective weights now, as logged in metrics.csv."""
        return {"weight_cls": self.w[0], "weight_reg": self.w[1]}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "w": list(self.w)}

    def check_name(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint weighting {state.get('name')!r} does not match {self.name!r}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_name(state)
        self.w = [float(v) for v in state["w"]]


class UncertaintyWeighting(FixedWeighting):
    name = "uncertainty"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.s = nn.Parameter(torch.zeros(N_TASKS, device=device))  # [s_c, s_r], log-variances

    def parameters(self) -> list[nn.Parameter]:
        return [self.s]

    def combine(self, losses: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        return kendall_total(losses["cls"], losses["reg"], self.s[0], self.s[1])

    def weights(self) -> dict[str, float]:
        s = self.s.detach().cpu()
        return {"weight_cls": math.exp(-float(s[0])), "weight_reg": 0.5 * math.exp(-float(s[1])),
                "s_cls": float(s[0]), "s_reg": float(s[1])}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "s": self.s.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_name(state)
        with torch.no_grad():
            self.s.copy_(state["s"].to(self.s.device))


class DWAWeighting(FixedWeighting):
    name = "dwa"

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.history: list[list[float]] = []

    def end_epoch(self, train_cls: float, train_reg: float) -> None:
        self.history.append([float(train_cls), float(train_reg)])
        self.w = dwa_weights(self.history, self.temperature)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "w": list(self.w), "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = [list(map(float, h)) for h in state["history"]]


def last_shared_weight(model: nn.Module) -> nn.Parameter:
    """The backbone's last convolution weight: the last layer both heads share."""
    convs = [m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]  # type: ignore[union-attr]
    return convs[-1].weight


class GradNormWeighting(FixedWeighting):
    name = "gradnorm"

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 1e-3,
        device: torch.device | str = "cpu",
        rank_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.alpha = alpha
        # Under DDP each rank sees its own batch; the update's inputs are averaged over the ranks so that every
        # rank takes the same step and the weights stay identical (the model's gradients are averaged by DDP).
        self.rank_mean = rank_mean or (lambda t: t)
        self.wp = nn.Parameter(torch.ones(N_TASKS, device=device))
        self.opt = torch.optim.Adam([self.wp], lr=lr)
        self.initial: torch.Tensor | None = None  # L(0), the first step's losses
        self.shared: nn.Parameter | None = None  # the model's last shared layer's weight

    def combine(self, losses: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
        task = torch.stack([losses["cls"], losses["reg"]])
        w = self.wp.detach().clone()
        # No finiteness test here: under DDP every rank must reach the same collectives; _update decides on
        # the rank-averaged values, which all ranks share.
        if torch.is_grad_enabled() and task.requires_grad:
            if self.shared is None:  # found once: the module walk is not per-step work
                self.shared = last_shared_weight(model)
            self._update(task, self.shared)
        return w[0] * task[0] + w[1] * task[1]

    def weights(self) -> dict[str, float]:
        w_cls, w_reg = self.wp.detach().cpu().tolist()  # the learned weights are the state; no copy per step
        return {"weight_cls": w_cls, "weight_reg": w_reg}

    def _update(self, task: torch.Tensor, shared: nn.Parameter) -> None:
        """One step of the weights towards the target gradient norms; the model's graph is kept for its
        own backward."""
        losses = self.rank_mean(task.detach())
        norms = self.rank_mean(torch.stack([
            torch.autograd.grad(task[k], shared, retain_graph=True, allow_unused=True)[0].norm()
            if task[k].requires_grad else task.new_zeros(())
            for k in range(N_TASKS)
        ]).detach())
        if not bool(torch.isfinite(losses).all() and torch.isfinite(norms).all()):
            return  # a bad batch (on any rank): no step; the training loop skips it too
        if self.initial is None:
            self.initial = losses.clone()
        g = self.wp * norms  # G_k = ||d(w_k L_k)/dW|| = w_k ||dL_k/dW||
        target = gradnorm_targets(g, losses, self.initial, self.alpha)
        self.opt.zero_grad(set_to_none=True)
        (g - target).abs().sum().backward()
        self.opt.step()
        with torch.no_grad():
            self.wp.clamp_(min=1e-3)
            self.wp.mul_(N_TASKS / self.wp.sum())

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "wp": self.wp.detach().cpu().clone(),
                "initial": None if self.initial is None else self.initial.cpu(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_name(state)  # the weights are `wp` itself; the base class's `w` is not used
        with torch.no_grad():
            self.wp.copy_(state["wp"].to(self.wp.device))
        self.initial = None if state["initial"] is None else state["initial"].to(self.wp.device)
        self.opt.load_state_dict(state["opt"])


def weighting_from_config(
    cfg: Config,
    device: torch.device | str = "cpu",
    rank_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FixedWeighting:
    """`rank_mean` (DDP: the mean of a tensor over the ranks) keeps GradNorm's weights equal on every rank."""
    m = cfg.multitask
    if cfg.task.mode != "multitask" or m.weighting == "fixed":
        return FixedWeighting(*fixed_weights(cfg))
    if m.weighting == "uncertainty":
        return UncertaintyWeighting(device)
    if m.weighting == "dwa":
        return DWAWeighting(m.dwa_temperature)
    return GradNormWeighting(m.gradnorm_alpha, cfg.optimizer.lr, device, rank_mean)
