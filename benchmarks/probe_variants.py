"""What else the probe could do, measured before building it: pooling of the frozen features, the order of the
frames that re-estimate BatchNorm, an out-of-fold recalibration of the time output, rotations and reflections, and
augmented views as extra training rows.

    python benchmarks/probe_variants.py [--stacks 12] [--seeds 0 1 2] [--out /tmp/cellmtl_pretrained]
        [--context "[-6,-3,0]"] [--dihedral | --views K] [--weights .weights/mobilenet_v2_imagenet.pt]

Each seed's experiment is the one quality_pretrained.py renders (shared through `--out`) and the network is its
`probe+ctx` variant (ImageNet MobileNetV2, 224 px, one ridge per class). The heads are fitted with the product's
own functions (cellmtl.training.probe: stack-grouped CV for both strengths) on features this script pools itself:

- pooling `avg` (the product: global average), `max`, `avg+max` (both concatenated), `avg+std`, and average pools
  of inner blocks' outputs (mid-level features, alone or concatenated with the last block's);
- BatchNorm statistics re-estimated on the training frames `ordered` (the product: index order, stack by stack, in
  batches of training.batch_size) or `shuffled` (a seeded permutation, the same batch size);
- `context as changes`: each sample's features as its current frame's and their change since each context frame
  (`cellmtl.training.probe.as_changes`, a linear basis change folded back into the linear heads), for both heads
  or for the infection head only (the product since 2026-12-02, measured here first);
- `--dihedral` (instead of the rows above but the product's): average-pooled features averaged over each frame's
  8 rotations and reflections (val and train), or the 8 transforms as training rows of their own with the val
  features averaged; infection head on changes;
- `oof`: the ridge's time output mapped by a line fitted to its out-of-fold predictions on the training stacks
  (undoing the shrinkage towards the mean, if there is one to undo);
- `--views K` (instead of the rows above but the product's): K augmented views of every training sample (the
  training loader's own `data.augment`: flips, rot90, per-channel gain and offset, the same for a sample's context
  frames) as extra training rows of both heads, the val frames as they are: what fine-tuning's augmentation gives,
  at K times the probe's feature time.

The `pool avg, BatchNorm frames ordered, context as changes (infection head)` row reproduces quality_pretrained.py's
`probe+ctx` figures (the plain `avg` / `ordered` row: the product before it). Prints val cls_auc and reg_mae per
seed and their mean; nothing here changes the product.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from holdout_common import make_data
from quality_pretrained import ROOT, overrides
from sklearn.linear_model import Ridge
from sklearn.metrics import roc_auc_score

from cellmtl.config import load_config
from cellmtl.data.dataset import EpochSampler, SampleIndex, TimeCourseDataset
from cellmtl.runtime import make_loader
from cellmtl.training import probe
from cellmtl.training.loop import calibration_loader, recalibrate_batchnorm
from cellmtl.training.rundir import close_logger
from cellmtl.training.state import setup

POOLS = {"avg": ("avg",), "max": ("max",), "avg+max": ("avg", "max"), "avg+std": ("avg", "std"),
         "avg of blocks 13, 16, 17, 18": ("avg13", "avg16", "avg17", "avg"),
         "avg of blocks 6, 10, 13, 16, 17, 18": ("avg6", "avg10", "avg13", "avg16", "avg17", "avg"),
         "avg of block 17 (before the last 1x1 conv)": ("avg17",),
         "avg of block 13": ("avg13",)}
INNER = (6, 10, 13, 16, 17)  # MobileNetV2 blocks whose outputs are pooled too (96 / 160 / 320 channels at 13-17)


@torch.no_grad()
def pooled(model, ds: TimeCourseDataset, batch_size: int, device: torch.device
           ) -> tuple[dict[str, np.ndarray], SampleIndex]:
    """Per sample of `ds`, its context frames' feature maps pooled three ways (and inner blocks' outputs averaged),
    concatenated oldest first."""
    single, plan = probe.context_frame_dataset(ds)
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("avg", "max", "std", *(f"avg{b}" for b in INNER))}
    for batch in make_loader(single, batch_size=batch_size, num_workers=0, device=device):
        maps = model.stem_input(batch["image"].to(device))
        for b, block in enumerate(model.backbone.features):  # torchvision MobileNetV2's conv trunk, block by block
            maps = block(maps)
            if b in INNER:
                parts[f"avg{b}"].append(maps.mean((2, 3)))
        parts["avg"].append(maps.mean((2, 3)))
        parts["max"].append(maps.amax((2, 3)))
        parts["std"].append(maps.std((2, 3)))
    return {k: torch.cat(v).cpu().numpy()[plan].reshape(len(ds), -1) for k, v in parts.items()}, ds.index


def standardised(tr: np.ndarray, va: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    std = probe.Standardiser.fit(tr.astype(np.float64))
    return std(tr.astype(np.float64)), std(va.astype(np.float64))


def fit_and_score(tr: np.ndarray, itr: SampleIndex, va: np.ndarray, iva: SampleIndex, oof: bool,
                  cls_features: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """The probe's heads (logistic; ridge per class, the predicted class picking the output) on train, val metrics.
    `cls_features` (train, val): other features for the infection head than for the time head."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's convergence / conditioning chatter, as probe.fit_heads does
        return _fit_and_score(tr, itr, va, iva, oof, cls_features)


def _fit_and_score(tr: np.ndarray, itr: SampleIndex, va: np.ndarray, iva: SampleIndex, oof: bool,
                   cls_features: tuple[np.ndarray, np.ndarray] | None) -> dict:
    a, b = standardised(tr, va)
    groups, labels = itr.stack.astype(np.int64), itr.infected.astype(np.int64)
    ca, cb = standardised(*cls_features) if cls_features is not None else (a, b)
    coef, icpt, _ = probe.fit_logistic(ca, labels, groups, balanced=False)
    logit = cb @ coef + icpt
    pred = np.zeros(len(b))
    for cls in (0, 1):
        keep = np.isfinite(itr.time_target) & (labels == cls)
        y = itr.time_target[keep].astype(np.float64)
        w, c, alpha, _ = probe.fit_ridge(a[keep], y, groups[keep])
        rows = (logit >= 0) == bool(cls)
        p = b[rows] @ w + c
        if oof:
            out = np.zeros(len(y))
            for f_tr, f_te in probe.stack_folds(groups[keep]):
                out[f_te] = Ridge(alpha=alpha).fit(a[keep][f_tr], y[f_tr]).predict(a[keep][f_te])
            slope, intercept = np.polyfit(out, y, 1)
            p = intercept + slope * p
        pred[rows] = p
    t = iva.time_target
    timed = np.isfinite(t)
    return {"cls_auc": float(roc_auc_score(iva.infected, logit)), "reg_mae": float(np.abs(pred - t)[timed].mean())}


@torch.no_grad()
def augmented_views(model, ds: TimeCourseDataset, views: int, batch_size: int, device: torch.device
                    ) -> list[np.ndarray]:
    """`views` augmented passes over `ds` in index order, keyed `(sample, view)` as training's `EpochSampler`
    keys `(sample, epoch)`, so each view is one epoch's augmentation: the network's pooled features of each
    sample, `[N, n_features]` per view."""
    model.eval()
    sampler = EpochSampler(len(ds), shuffle=False, seed=0)  # the order only; augmentation is seeded per key
    out = []
    for view in range(views):
        sampler.set_epoch(view)
        loader = make_loader(ds, batch_size=batch_size, num_workers=0, device=device, sampler=sampler)
        out.append(torch.cat([model.features(batch["image"].to(device)).cpu() for batch in loader]).numpy())
    return out


def fit_on_changes(tr: np.ndarray, itr: SampleIndex, va: np.ndarray, iva: SampleIndex, n_ctx: int) -> dict:
    """`fit_and_score` with the infection head on changes (`probe.as_changes`), as the product fits it."""
    return fit_and_score(tr, itr, va, iva, False, (probe.as_changes(tr, n_ctx), probe.as_changes(va, n_ctx)))


def one_seed(args: argparse.Namespace, seed: int) -> list[dict]:
    manifest = make_data(args.out, seed, args.stacks)
    cfg_path = args.out / f"config_probe_variants_{args.stacks}_seed{seed}.yaml"
    cfg_path.write_text(yaml.safe_dump({"experiment_name": f"probe_variants_{args.stacks}_seed{seed}",
                                        "output_dir": str(args.out / "runs"), "seed": seed,
                                        "data": {"manifest": str(manifest)}, "training": {"progress": False}}))
    sets = [o for o in overrides("probe+ctx", args.weights) if not o.startswith("data.temporal_context_hours")]
    s = setup(load_config(cfg_path, [*sets, f"data.temporal_context_hours={args.context}"]))
    bs = s.cfg.training.batch_size
    n_ctx = s.model.spec.feature_frames
    rows = []
    try:
        alone = args.dihedral or args.views > 0  # their rows beside the product's, nothing else
        for order in ("ordered",) if alone else ("ordered", "shuffled"):
            if order == "ordered":  # the product's frames (all of them at this size)
                loader = calibration_loader(s)
            else:
                perm = torch.randperm(len(s.calib_ds), generator=torch.Generator().manual_seed(seed)).tolist()
                loader = make_loader(s.calib_ds, batch_size=bs, num_workers=0, device=s.device, sampler=perm)
            recalibrate_batchnorm(s.model, loader, s.device)
            tr, itr = pooled(s.model, s.calib_ds, bs, s.device)
            va, iva = pooled(s.model, s.val_ds, bs, s.device)
            if order == "ordered" and args.views:
                x_tr = np.concatenate([tr["avg"], *augmented_views(s.model, s.train_ds, args.views, bs, s.device)])
                m = fit_on_changes(x_tr, SampleIndex.concat([itr] * (args.views + 1)), va["avg"], iva, n_ctx)
                rows.append({"seed": seed, "variant": f"pool avg, {args.views} augmented views of each training "
                             "sample as extra rows, context as changes (infection head)", **m})
                print(json.dumps(rows[-1]), flush=True)
            if order == "ordered" and args.dihedral:
                # the product's per-orientation features (probe.dataset_features), BatchNorm statistics as above
                rot = copy.deepcopy(s.model)
                rot.spec = dataclasses.replace(rot.spec, average_rotations=True)
                loader = functools.partial(make_loader, batch_size=bs, num_workers=0, device=s.device)
                d_tr, d_va = (probe.dataset_features(rot, ds, loader, s.device) for ds in (s.calib_ds, s.val_ds))
                m_tr, m_va = d_tr.mean(1), d_va.mean(1)
                every = d_tr.reshape(-1, d_tr.shape[-1])  # each transform a training row of its own
                for name, a, ia in (("dihedral mean of train and val frames", m_tr, itr),
                                    ("8 transforms as training rows, val dihedral mean", every, itr.repeat(8))):
                    m = fit_on_changes(a, ia, m_va, iva, n_ctx)
                    rows.append({"seed": seed, "variant": f"pool avg, {name}, context as changes (infection head)",
                                 **m})
                    print(json.dumps(rows[-1]), flush=True)
            for pool, keys in POOLS.items():
                if alone and pool != "avg":
                    continue
                if order == "shuffled" and pool.startswith("avg of"):
                    continue  # inner blocks: measured with the product's frame order only
                x_tr, x_va = (np.concatenate([d[k] for k in keys], axis=1) for d in (tr, va))
                changes = (probe.as_changes(x_tr, n_ctx), probe.as_changes(x_va, n_ctx))
                # (time oof-recalibrated, context as changes for): the plain fit, then what applies to this row
                modes = [(False, "")] + [(False, "both heads"), (False, "infection head")] * (order == "ordered") \
                    + [(True, "")] * (pool == "avg")
                for oof, diff in modes:
                    a, b = changes if diff == "both heads" else (x_tr, x_va)
                    m = fit_and_score(a, itr, b, iva, oof, changes if diff == "infection head" else None)
                    name = f"pool {pool}, BatchNorm frames {order}" + (", time oof-recalibrated" if oof else "") \
                        + (f", context as changes ({diff})" if diff else "")
                    rows.append({"seed": seed, "variant": name, **m})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        close_logger(s.logger)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stacks", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("/tmp/cellmtl_pretrained"))
    ap.add_argument("--context", default="[-6,-3,0]", help="data.temporal_context_hours")
    instead = ap.add_mutually_exclusive_group()
    instead.add_argument("--dihedral", action="store_true", help="instead: features averaged over the 8 rotations "
                    "and reflections of each frame (8x the feature time), beside the product's rows (pool avg)")
    instead.add_argument("--views", type=int, default=0, metavar="K", help="instead: K augmented views of every "
                    "training sample as extra training rows, beside the product's rows (pool avg)")
    ap.add_argument("--weights", type=Path, default=ROOT / ".weights" / "mobilenet_v2_imagenet.pt")
    args = ap.parse_args()
    rows = [r for seed in args.seeds for r in one_seed(args, seed)]
    print(f"\n### {args.stacks} stacks, probe with temporal context {args.context}, seeds {args.seeds}\n")
    print("| variant | cls_auc per seed | reg_mae per seed (h) | mean reg_mae (h) |\n| --- | --- | --- | --- |")
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        aucs = " / ".join(f"{r['cls_auc']:.3f}" for r in mine)
        maes = " / ".join(f"{r['reg_mae']:.2f}" for r in mine)
        print(f"| {name} | {aucs} | {maes} | {np.mean([r['reg_mae'] for r in mine]):.2f} |")


if __name__ == "__main__":
    main()
