"""The multi-task loss: `classification_weight * BCEWithLogits + regression_weight * SmoothL1`.

The time term is computed on the scaled time axis (hours minus the training mean, divided by the
training std or `multitask.time_scale_hours`), so SmoothL1's beta of 1 means about one std, and both
terms start at comparable magnitudes. Samples without a time target are masked out of it.
`class_weights` (from `data.balance: weights`) weight each frame's BCE term by its class: the mean of
`w[y] * bce`, so a minority class counts as much in total as the majority.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MultiTaskLoss:
    mode: str = "multitask"
    classification_weight: float = 1.0
    regression_weight: float = 1.0
    pos_weight: float | None = None
    class_weights: tuple[float, float] | None = None  # (uninfected, infected) per-frame BCE weights

    def __call__(
        self,
        out: dict[str, torch.Tensor],
        infected: torch.Tensor,
        time_scaled: torch.Tensor,
        has_time: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """out: model outputs; infected float [B] (0/1); time_scaled float [B]; has_time bool [B].
        Returns `total`, `cls`, `reg` (each a scalar tensor; absent tasks give 0)."""
        zero = next(iter(out.values())).sum() * 0.0  # keeps the graph and device
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
            per = F.smooth_l1_loss(out["time"].float(), target, reduction="none")
            reg = (per * mask).sum() / mask.sum().clamp(min=1.0)
        total = zero
        if self.mode != "regression":
            total = total + self.classification_weight * cls
        if self.mode != "classification":
            total = total + self.regression_weight * reg
        return {"total": total, "cls": cls, "reg": reg}
