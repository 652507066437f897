"""The linear probe (`training.strategy: probe`, and lp_ft's first stage): a frozen backbone's features, computed once
per frame, and linear heads fitted to them in closed form.

Infection: L2-regularised logistic regression, with temporal context (`features` fusion) on the current frame's
features and their change since each context frame (`as_changes`: the same linear span, but standardised and penalised
as changes; docs/VALIDATION.md "What else was tried on the probe" measures it); time: ridge regression on the scaled
time axis (one per class with `multitask.time_head: per_class`). Both regularisation strengths are chosen by cross-
validation over whole training *stacks* (frames of one well are near copies, so leave-one-frame-out would pick almost
no regularisation and fit each well's own offset). The fitted coefficients are written into the model's `Linear`
heads, so the result is an ordinary network: predict, evaluate and the exports run it unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cellmtl.data.dataset import SampleIndex, TimeCourseDataset, context_frames
from cellmtl.models import MultiTaskNet

RIDGE_ALPHAS = np.logspace(-2, 5, 15)
LOGISTIC_CS = np.logspace(-4, 2, 13)
MAX_FOLDS = 4


@torch.no_grad()
def frame_features(model: MultiTaskNet, loader, device: torch.device) -> np.ndarray:
    """`model.oriented_features` of every sample of `loader`, in order: float32 `[N, orientations, F]` (backbone in
    eval mode)."""
    model.eval()
    out = []
    for batch in loader:
        feats = model.oriented_features(batch["image"].to(device, non_blocking=True))
        out.append(feats.float().cpu().transpose(0, 1))
    width = model.n_features // model.spec.feature_frames
    return torch.cat(out).numpy() if out else np.zeros((0, model.orientations, width), np.float32)


def context_plan(ds: TimeCourseDataset) -> tuple[SampleIndex, np.ndarray]:
    """For `features` fusion: the distinct frames that `ds`'s samples and their context read (a SampleIndex
    without targets) and, per sample, the rows of those frames oldest first: int64 `[N, K]`. Each frame then goes
    through the backbone once, however many samples' context it is part of."""
    assert ds.frame_offsets is not None
    rows: dict[tuple[int, int], int] = {}
    plan = np.zeros((len(ds), len(ds.frame_offsets[0])), dtype=np.int64)
    for i in range(len(ds)):
        s, f = int(ds.index.stack[i]), int(ds.index.frame[i])
        for j, t in enumerate(context_frames(f, ds.frame_offsets[s], ds.readers[s].info.n_frames)):
            plan[i, j] = rows.setdefault((s, t), len(rows))
    keys = np.array(list(rows), dtype=np.int32).reshape(-1, 2)
    n = len(keys)
    frames = SampleIndex(keys[:, 0], keys[:, 1], np.zeros(n, np.float32), np.full(n, -1, np.int8),
                         np.full(n, np.nan, np.float32))
    return frames, plan


def context_frame_dataset(ds: TimeCourseDataset) -> tuple[TimeCourseDataset, np.ndarray]:
    """`context_plan` as a dataset of those distinct frames, one image each (no context, no augmentation), and the
    plan: features of its samples, `[plan]`, give each sample of `ds` its context's features oldest first."""
    frames, plan = context_plan(ds)
    single = TimeCourseDataset([r.info for r in ds.readers], ds.stack_ids, frames, channels=ds.channels,
                               image_size=ds.image_size, normalizer=ds.normalizer)
    return single, plan


def dataset_features(model: MultiTaskNet, ds: TimeCourseDataset, make_loader, device: torch.device) -> np.ndarray:
    """The pooled features that the heads read for every sample of `ds` (no augmentation) in each orientation,
    `[N, orientations, n_features]` (one orientation: the frame as it is; the 8 `dihedral` ones with
    `model.average_rotations`, the same for every context frame of a sample). Their mean over orientations is
    `model.features` on the sample's images. `make_loader(dataset)` builds the DataLoader."""
    spec = model.spec
    if spec.feature_frames == 1:
        return frame_features(model, make_loader(ds), device)
    single, plan = context_frame_dataset(ds)
    per_frame = frame_features(model, make_loader(single), device)  # [frames, orientations, F]
    return per_frame[plan].transpose(0, 2, 1, 3).reshape(len(ds), model.orientations, -1)


@dataclass
class Standardiser:
    """Per-feature mean and spread of the training features. Spreads are floored at a tenth of the median spread
    (1 where every feature is constant): folded back onto raw features, a near-constant feature's coefficient is
    divided by its spread, and lp_ft's fine-tuning, which moves every feature, would turn that into huge outputs."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        std = x.std(axis=0)
        moving = std[std > 1e-6]
        floor = 0.1 * float(np.median(moving)) if len(moving) else 1.0
        return cls(x.mean(axis=0), np.maximum(std, floor))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def fold(self, coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coefficients `[O, F]` and intercepts `[O]` on standardised features -> the same map on raw features."""
        w = coef / self.std
        return w, intercept - w @ self.mean


def as_changes(x: np.ndarray, k: int) -> np.ndarray:
    """Features of `k` context frames, concatenated oldest first, -> the current frame's, then its change since
    each older frame (`current - older`), oldest first. A ridge or L2 logistic fit on the plain concatenation can
    use a change only through two large opposite coefficients, which the penalty discourages: the first frames
    after an onset, whose features have only begun to move, are then missed (val AUC 0.957 -> 0.982 on the
    hardest seed of the hold-out experiment)."""
    if k == 1:
        return x
    parts = np.split(x, k, axis=1)
    return np.concatenate([parts[-1], *(parts[-1] - older for older in parts[:-1])], axis=1)


def changes_to_frames(w: np.ndarray, k: int) -> np.ndarray:
    """Coefficients `[O, k*F]` on `as_changes` features -> the same map on the plain concatenation:
    `w_cur . cur + sum_j d_j . (cur - f_j)` = `(w_cur + sum_j d_j) . cur - sum_j d_j . f_j`."""
    if k == 1:
        return w
    cur, *changes = np.split(w, k, axis=1)
    return np.concatenate([-c for c in changes] + [cur + sum(changes)], axis=1)


def stack_folds(groups: np.ndarray, labels: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Cross-validation folds of whole stacks (`groups`: stack number per frame), stratified by `labels` where
    given; None where there are fewer than 3 stacks (then a fixed strength is used)."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < 3:
        return None
    if labels is not None:
        per_class = min(len(np.unique(groups[labels == c])) for c in np.unique(labels))
        if per_class < 2:
            return None
        k = min(MAX_FOLDS, per_class)
        return list(StratifiedGroupKFold(n_splits=k).split(groups, labels, groups))
    return list(GroupKFold(n_splits=min(MAX_FOLDS, n_groups)).split(groups, groups, groups))


def fit_ridge(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """Ridge of `y` on standardised `x`, strength by stack-grouped CV: (coef [F], intercept, alpha, mean squared
    out-of-fold residual)."""
    from sklearn.linear_model import Ridge

    folds = stack_folds(groups)
    alpha = 1.0
    if folds is not None:
        errors = []
        for a in RIDGE_ALPHAS:
            sq = [np.mean((Ridge(alpha=a).fit(x[tr], y[tr]).predict(x[te]) - y[te]) ** 2) for tr, te in folds]
            errors.append(float(np.mean(sq)))
        alpha = float(RIDGE_ALPHAS[int(np.argmin(errors))])
        mse = min(errors)
    model = Ridge(alpha=alpha).fit(x, y)
    if folds is None:
        mse = float(np.mean((model.predict(x) - y) ** 2))
    return model.coef_.astype(np.float64), float(model.intercept_), alpha, mse


def fit_logistic(x: np.ndarray, y: np.ndarray, groups: np.ndarray, balanced: bool) -> tuple[np.ndarray, float, float]:
    """L2 logistic regression of `y` (0/1) on standardised `x`, C by stack-grouped CV on log-loss: (coef [F],
    intercept, C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    weight = "balanced" if balanced else None
    folds = stack_folds(groups, y)
    c = 1.0
    if folds is not None:
        losses = []
        for cand in LOGISTIC_CS:
            fold_losses = []
            for tr, te in folds:
                clf = LogisticRegression(C=cand, class_weight=weight, max_iter=2000).fit(x[tr], y[tr])
                fold_losses.append(log_loss(y[te], clf.predict_proba(x[te])[:, 1], labels=[0, 1]))
            losses.append(float(np.mean(fold_losses)))
        c = float(LOGISTIC_CS[int(np.argmin(losses))])
    clf = LogisticRegression(C=c, class_weight=weight, max_iter=5000).fit(x, y)
    return clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), c


def _standardised(x: np.ndarray) -> tuple[Standardiser, np.ndarray]:
    std = Standardiser.fit(x)
    return std, std(x)


def _linear(head: nn.Module | None) -> nn.Linear:
    last = head[-1] if isinstance(head, nn.Sequential) else None
    if not isinstance(last, nn.Linear) or any(isinstance(m, nn.Linear) for m in list(head)[:-1]):
        raise ValueError("the probe fits linear heads (model.head_hidden: 0)")
    return last


def _write(layer: nn.Linear, rows: Sequence[int], w: np.ndarray, b: np.ndarray) -> None:
    with torch.no_grad():
        for r, wr, br in zip(rows, np.atleast_2d(w), np.atleast_1d(b), strict=True):
            layer.weight[r].copy_(torch.from_numpy(wr.astype(np.float32)))
            layer.bias[r] = float(br)


def fit_heads(model: MultiTaskNet, feats: np.ndarray, index: SampleIndex, *, balanced: bool = False) -> dict:
    """Fit the model's linear heads in place on training features `[N, F]` of the frames of `index` (time targets
    in hours, scaled with the model's own time scaling); returns what was chosen (logged and kept in results.json).
    A class without time targets (multitask.uninfected_time: ignore) keeps a zero output."""
    raw = feats.astype(np.float64)
    std = Standardiser.fit(raw)
    x = std(raw)
    groups = index.stack.astype(np.int64)
    labels = index.infected.astype(np.int64)
    info: dict = {}
    logit = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's convergence / conditioning chatter on tiny problems
        if model.cls_head is not None:
            k = model.spec.feature_frames
            std_c, xc = (std, x) if k == 1 else _standardised(as_changes(raw, k))
            known = labels >= 0
            coef, icpt, c = fit_logistic(xc[known], labels[known], groups[known], balanced)
            w, b = std_c.fold(coef[None], np.array([icpt]))
            _write(_linear(model.cls_head), [0], changes_to_frames(w, k), b)
            info["logistic_C"] = c
            logit = xc @ coef + icpt
        if model.time_head is not None:
            info.update(_fit_time(model, x, std, index, groups, labels, logit))
    return info


def _fit_time(model: MultiTaskNet, x: np.ndarray, std: Standardiser, index: SampleIndex, groups: np.ndarray,
              labels: np.ndarray, logit: np.ndarray | None) -> dict:
    spec = model.spec
    layer = _linear(model.time_head)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    scaled = (index.time_target.astype(np.float64) - float(model.time_shift)) / float(model.time_scale)
    if spec.time_head == "conditioned":
        assert logit is not None
        z = (logit - logit.mean()) / max(float(logit.std()), 1e-6)
        x = np.concatenate([x, z[:, None]], axis=1)
        std = Standardiser(np.append(std.mean, logit.mean()), np.append(std.std, max(float(logit.std()), 1e-6)))
    outputs = [(0, 0), (1, 1)] if spec.time_head == "per_class" else [(0, None)]  # (row, class or all)
    n_means = len(outputs)
    info: dict = {}
    for row, cls in outputs:
        keep = np.isfinite(scaled) & ((labels == cls) if cls is not None else True)
        if keep.sum() < 2:
            continue
        coef, icpt, alpha, mse = fit_ridge(x[keep], scaled[keep], groups[keep])
        _write(layer, [row], *std.fold(coef[None], np.array([icpt])))
        name = {None: "all", 1: "infected", 0: "uninfected"}[cls]
        info[f"ridge_alpha_{name}"] = alpha
        if spec.time_nll:  # constant log-variance: the cross-validated residual variance (scaled axis)
            _write(layer, [row + n_means], np.zeros((1, layer.in_features)), np.array([np.log(max(mse, 1e-6))]))
    return info
