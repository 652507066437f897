"""Which epoch is best, and the notes that say when to doubt it: selection by `training.select_metric` with ties to the
lower validation loss, the hint when another epoch read the clock better, the note when the time head does not
follow the clock."""


from __future__ import annotations

import math
from typing import Any

from cellmtl.metrics import (
    CLS_METRICS,
    FLAT_SLOPE,
    SLOPE_METRICS,
    metric_direction,
)

TIE_TOL = 1e-4


def is_better(val: dict[str, float | None], best: dict[str, float | None] | None, metric: str) -> bool:
    """Does `val` beat `best` on `metric`? Ties (within 1e-4, common once AUC saturates at 1.0) go to the
    lower validation total_loss, so a saturated AUC does not freeze the choice at the first perfect epoch."""
    value = val.get(metric)
    if value is None or math.isnan(value):
        return False
    if best is None or best.get(metric) is None:
        return True
    ref = best[metric]
    if abs(value - ref) <= TIE_TOL and metric != "total_loss":
        loss, ref_loss = val.get("total_loss"), best.get("total_loss")
        return loss is not None and ref_loss is not None and loss < ref_loss
    return value > ref if metric_direction(metric) == "max" else value < ref


VAL_LOG_KEYS = ("total_loss", "cls_auc", "cls_acc", "reg_mae", "reg_rmse")


def val_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """A history row's validation metrics, without the `val_` prefix."""
    return {k.removeprefix("val_"): v for k, v in row.items() if k.startswith("val_")}


def best_val_metrics(history: list[dict[str, Any]], best_epoch: int) -> dict[str, Any]:
    """Validation metrics of the best epoch so far, read back from the history (history row e is epoch e)."""
    return val_metrics(history[best_epoch - 1])


def selection_hint(history: list[dict[str, Any]], best_epoch: int, select_metric: str) -> str | None:
    """A note when best.pt was chosen by a classification metric and another epoch's time error was much
    lower: AUC often saturates in the first epochs, before the time head has learned, and a user reading
    only best.pt's metrics would not see that a better-balanced epoch exists."""
    if select_metric not in CLS_METRICS or not 1 <= best_epoch <= len(history):
        return None
    maes = {e: float(h["val_reg_mae"]) for e, h in enumerate(history, start=1)
            if h.get("val_reg_mae") is not None and math.isfinite(float(h["val_reg_mae"]))}
    chosen = maes.get(best_epoch)
    if chosen is None:
        return None
    epoch = min(maes, key=maes.__getitem__)
    low = maes[epoch]
    if chosen - low < max(0.5, 0.2 * chosen):
        return None
    other = history[epoch - 1].get(f"val_{select_metric}")
    other_txt = f", {select_metric} {float(other):.3f}" if other is not None else ""
    return (f"note: best.pt is epoch {best_epoch} by {select_metric} (reg_mae {chosen:.2f} h); epoch {epoch} "
            f"reached reg_mae {low:.2f} h{other_txt}. If the time estimate matters, select by total_loss "
            "(training.select_metric) or use last.pt")


def time_head_note(val: dict[str, Any], pretrained: bool = False) -> str | None:
    """A note when, at best.pt, the predicted time hardly changes inside the val stacks of a class: the
    time head then gives each new well about one value (its MAE can still look moderate), and `predict`'s
    onset estimates for such wells mean little. Measured on a hold-out experiment with 8 training wells
    (docs/VALIDATION.md, "Quality on unseen data"), where this was the case for every infected val stack."""
    flat = [(k.removeprefix("reg_slope_"), float(val[k])) for k in SLOPE_METRICS
            if val.get(k) is not None and float(val[k]) < FLAT_SLOPE]
    if not flat:
        return None
    what = " and ".join(f"{c} stacks (slope {v:.2f})" for c, v in flat)
    remedy = ("more training wells help (docs/VALIDATION.md, \"Quality on unseen data\")" if pretrained else
              "more training wells help, and so do pretrained weights: model.name mobilenet_v2 with model.weights "
              "(or model.pretrained) and training.strategy probe (docs/GUIDE.md, \"Few wells? Start from pretrained "
              "weights\")")
    return (f"note: inside the val {what} the predicted time hardly follows the clock (1 = it does): the "
            "time head gives each new well about one value, so do not read time or est_onset_hour from it for "
            f"such wells; {remedy}")


