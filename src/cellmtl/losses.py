"""The per-task loss terms: `cls` = BCEWithLogits, `reg` = the regression loss on the time head. How they
are combined into the total that is back-propagated (and the validation `total_loss`) lives in one place,
`cellmtl.weighting`.

The time term is computed on the scaled time axis (hours minus the training mean, divided by the
training std or `multitask.time_scale_hours`), so SmoothL1's beta of 1 means about one std, and both
terms start at comparable magnitudes. Samples without a time target are masked out of it.
`class_weights` (from `data.balance: weights`) weight each frame's BCE term by its class: the mean of
`w[y] * bce`, so a minority class counts as much in total as the majority.

Regression losses: `smooth_l1` (default), `l1`, `mse`, or `gaussian_nll`, where the head also predicts a
log-variance and the loss is `0.5 * (logvar + (y - mu)^2 / exp(logvar))` (the Gaussian NLL without its
constant), so the model can say which frames it is unsure about. With a `per_class` time head the loss uses
the output of the sample's true class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cellmtl.config import Config

REGRESSION_LOSSES = ("smooth_l1", "l1", "mse", "gaussian_nll")
LOGVAR_CLAMP = (-10.0, 10.0)  # keeps exp(-logvar) finite early in training


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample `0.5 * (logvar + (target - mean)^2 * exp(-logvar))`, all [B] float32."""
    logvar = logvar.clamp(*LOGVAR_CLAMP)
    return 0.5 * (logvar + (target - mean) ** 2 * torch.exp(-logvar))


def per_sample_regression(
    kind: str, pred: torch.Tensor, target: torch.Tensor, logvar: torch.Tensor | None = None
) -> torch.Tensor:
    """Unreduced regression loss [B] on the scaled time axis."""
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none")
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if kind == "mse":
        return F.mse_loss(pred, target, reduction="none")
    if kind == "gaussian_nll":
        if logvar is None:
            raise ValueError("gaussian_nll needs a log-variance output")
        return gaussian_nll(pred, logvar, target)
    raise ValueError(f"regression loss must be one of {REGRESSION_LOSSES}, got {kind!r}")


def true_class_time(out: dict[str, torch.Tensor], infected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(time mean, log-variance or None) [B]: the true class's column of a per_class head, else `time`.
    Unknown labels (-1) fall back to the predicted class's output; they carry no time target anyway."""
    if "time_per_class" not in out:
        return out["time"].float(), (out["time_logvar"].float() if "time_logvar" in out else None)
    known = infected >= 0
    col = torch.where(known, infected.clamp(min=0), (out["infected"].detach() >= 0).to(infected.dtype))
    col = col.long().unsqueeze(-1)
    mean = out["time_per_class"].float().gather(1, col).squeeze(-1)
    lv = out.get("time_logvar_per_class")
    return mean, (None if lv is None else lv.float().gather(1, col).squeeze(-1))


@dataclass(frozen=True)
class MultiTaskLoss:
    """The unweighted task losses of a batch; a task the model has no head for gives 0."""

    pos_weight: float | None = None
    class_weights: tuple[float, float] | None = None  # (uninfected, infected) per-frame BCE weights
    regression_loss: str = "smooth_l1"

    def __call__(
        self,
        out: dict[str, torch.Tensor],
        infected: torch.Tensor,
        time_scaled: torch.Tensor,
        has_time: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """out: model outputs; infected float [B] (0/1); time_scaled float [B]; has_time bool [B].
        Returns `cls` and `reg` (each a scalar tensor; absent tasks give 0)."""
        zero = next(iter(out.values())).sum() * 0.0 + 0.0  # keeps the graph and device; + 0.0 turns -0.0 into 0.0
        cls = reg = zero
        if "infected" in out:
            logit = out["infected"].float()
            pw = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=logit.device)
            weight = None
            if self.class_weights is not None:
                w0, w1 = self.class_weights
                weight = torch.where(infected > 0.5, w1, w0).to(logit.device, torch.float32)
            cls = F.binary_cross_entropy_with_logits(logit, infected.float(), weight=weight, pos_weight=pw)
        if "time" in out:
            # Masked mean without boolean indexing: no host-device sync, no NaN from missing targets.
            mask = has_time.float()
            target = torch.where(has_time, time_scaled.float(), torch.zeros_like(time_scaled, dtype=torch.float32))
            pred, logvar = true_class_time(out, infected)
            per = per_sample_regression(self.regression_loss, pred, target, logvar)
            reg = (per * mask).sum() / mask.sum().clamp(min=1.0)
        return {"cls": cls, "reg": reg}


def loss_from_config(
    cfg: Config, pos_weight: float | None = None, class_weights: tuple[float, float] | None = None
) -> MultiTaskLoss:
    return MultiTaskLoss(pos_weight, class_weights, cfg.multitask.regression_loss)
