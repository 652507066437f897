#!/usr/bin/env python
"""Training-throughput benchmark: is the model kept fed?

    python benchmarks/bench_train.py [--model resnet18] [--size 128] [--batch 32] [--quick] [--compare]

In one process, with the same model, batch size, threads and training step (`training.train_one_epoch`,
so the non-finite checks, clipping and scheduler are included on both sides), alternately measures

(a) model only: forward + backward + optimiser step on batches already in memory (`model_img_s`);
(b) the full pipeline: frames read from TIFF files on disk through `TimeCourseDataset` (normalise,
    augment) and the training DataLoader, exactly as `cellmtl train` builds them (`train_img_s`);
(c) inference through the pipeline: `run_model` over the training frames, no augmentation (`infer_img_s`);
and the pipeline alone, iterating the training loader without a model (`data_only_img_s`), and (a) again with
every core, whatever `--threads` says (`model_img_s_all_cores`): `vs_best_model` is (b) against the better of
the two (a), what the machine could do, so a thread setting that starves the model shows.

The first epoch of each is a warm-up (worker start, page cache, the optional frame cache, cuDNN autotune).
Rounds alternate (a) and (b), in alternating order, and the reported figures are medians, because the
machines here are shared and noisy; `pipeline_efficiency` is the median of per-round ratios b/a.
`--compare` also measures other `data.num_workers` / `data.cache` settings against (a). The last line is

    pipeline_efficiency=<b/a> vs_best_model=<b/max(a)> train_img_s=<b> model_img_s=<a> ... infer_img_s=<c>
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does, before torch is imported

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

from cellmtl.config import config_from_dict  # noqa: E402
from cellmtl.engine import run_model  # noqa: E402
from cellmtl.runtime import make_loader  # noqa: E402
from cellmtl.training import loop, rundir, state  # noqa: E402


def write_experiment(root: Path, n_stacks: int, n_frames: int, size: int, compress: bool = False) -> Path:
    """uint16 2-channel ImageJ hyperstacks (TCYX) with some structure; half infected (onset 0 h); `compress`:
    zlib-compressed pages (decoding then costs CPU in the DataLoader, as with many microscope exports)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["stack_id,path,condition,infection_onset_hour"]
    for k in range(n_stacks):
        arr = rng.integers(200, 3000, size=(n_frames, 2, size, size), dtype=np.uint16)
        arr[:, 1] += np.uint16(600 * (k % 2))
        tifffile.imwrite(root / f"s{k:03d}.tif", arr, imagej=True, metadata={"axes": "TCYX"},
                         compression="zlib" if compress else None)
        rows.append(f"s{k:03d},s{k:03d}.tif,{'infected' if k % 2 == 0 else 'uninfected'},{'0' if k % 2 == 0 else ''}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def make_setup(manifest: Path, out: Path, args: argparse.Namespace, workers: int, cache: str) -> state.Setup:
    raw = {
        "experiment_name": "bench",
        "output_dir": str(out),
        "seed": 0,
        "data": {"manifest": str(manifest), "image_size": args.size, "num_workers": workers, "cache": cache,
                 "val_fraction": 0.25},
        "model": {"name": args.model},
        "training": {"epochs": 1000, "batch_size": args.batch, "progress": False, "compile": args.compile,
                     "device": args.device, "warmup_epochs": 0.0, "num_threads": args.threads},
    }
    return state.setup(config_from_dict(raw, "bench_train"))


def in_memory_batches(s: state.Setup, loader, n_batches: int) -> list[dict]:
    """Real batches from the pipeline's training `loader`, kept in memory (on the GPU when there is one)."""
    out = []
    for batch in loader:
        out.append({k: v.to(s.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        if len(out) == n_batches:
            break
    return out


def timed(s: state.Setup, fn) -> float:
    if s.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if s.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(args: argparse.Namespace, manifest: Path, out: Path, settings: list[tuple[int, str]]) -> dict[str, float]:
    """Median images/s of (a), and of (b) for each (workers, cache) setting, rounds alternating."""
    setups = {st: make_setup(manifest, out, args, *st) for st in settings}
    main = setups[settings[0]]
    samplers_loaders = {st: loop.build_loaders(s)[:2] for st, s in setups.items()}
    n_train = len(samplers_loaders[settings[0]][0]) // args.batch
    memory = in_memory_batches(main, samplers_loaders[settings[0]][1], n_train)
    imgs = sum(len(b["image"]) for b in memory)
    epoch = [1]

    def pipeline(st):
        sampler, loader = samplers_loaders[st]
        sampler.set_epoch(epoch[0])
        loop.train_one_epoch(setups[st], loader, epoch[0])

    ratios: dict[tuple[int, str], list[float]] = {st: [] for st in settings}
    model_s, pipe_s = [], {st: [] for st in settings}
    for r in range(args.rounds + 1):  # round 0: warm-up
        epoch[0] += 1
        b_first = r % 2 == 0  # alternate the order too: no setting always runs right after another
        times = {}
        for st in settings if b_first else []:
            times[st] = timed(setups[st], lambda st=st: pipeline(st))
        a = imgs / timed(main, lambda: loop.train_one_epoch(main, memory, epoch[0]))
        for st in [] if b_first else settings:
            times[st] = timed(setups[st], lambda st=st: pipeline(st))
        for st in settings:
            b = imgs / times[st]
            if r:
                pipe_s[st].append(b)
                ratios[st].append(b / a)
        if r:
            model_s.append(a)
            print(f"round {r}: model {a:.1f} img/s | " + " | ".join(
                f"workers={w} cache={c} {pipe_s[(w, c)][-1]:.1f} img/s" for w, c in settings), file=sys.stderr)
    sampler, loader = samplers_loaders[settings[0]]

    def data_only() -> None:
        sampler.set_epoch(epoch[0])
        for _ in loader:
            pass

    data = [imgs / timed(main, data_only) for _ in range(3)]  # what the pipeline could deliver without the model
    # the best the model alone does on this machine: every core, whatever the setting under test uses
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    best_model = []
    for _ in range(2):
        epoch[0] += 1
        best_model.append(imgs / timed(main, lambda: loop.train_one_epoch(main, memory, epoch[0])))
    torch.set_num_threads(threads)
    infer_ds = main.calib_ds
    infer_loader = make_loader(infer_ds, batch_size=args.batch, num_workers=main.cfg.data.num_workers,
                                        device=main.device)
    run_model(main.model, infer_loader, main.device, amp_dtype=main.amp_dtype)  # warm-up
    infer = [len(infer_ds) / timed(main, lambda: run_model(main.model, infer_loader, main.device,
                                                            amp_dtype=main.amp_dtype)) for _ in range(3)]
    for s in setups.values():
        rundir.close_logger(s.logger)
    res = {"model_img_s": float(np.median(model_s)), "infer_img_s": float(np.median(infer)),
           "model_img_s_all_cores": float(np.median(best_model)),
           f"data_only_img_s[workers={settings[0][0]},cache={settings[0][1]}]": float(np.median(data))}
    for st in settings:
        res[f"train_img_s[workers={st[0]},cache={st[1]}]"] = float(np.median(pipe_s[st]))
        res[f"efficiency[workers={st[0]},cache={st[1]}]"] = float(np.median(ratios[st]))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=128, help="model input side (stored frames are this size too)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--stacks", type=int, default=8)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the recommended)")
    ap.add_argument("--cache", choices=("none", "memory"), default="memory")
    ap.add_argument("--compile", action="store_true", help="training.compile: true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="training.num_threads (default: cellmtl's policy)")
    ap.add_argument("--compress", action="store_true", help="zlib-compressed TIFF stacks")
    ap.add_argument("--compare", action="store_true", help="also measure other workers x cache settings")
    ap.add_argument("--quick", action="store_true", help="CI size: resnet18, 96 px, 8 stacks x 24 frames, 3 rounds")
    args = ap.parse_args()
    if args.quick:
        args.model, args.size, args.stacks, args.frames, args.rounds = "resnet18", 96, 8, 24, 3
    if args.workers is None:  # measured (docs/PERFORMANCE.md): on few cores workers only take the model's
        args.workers = 0 if (os.cpu_count() or 1) <= 4 and not torch.cuda.is_available() else 4
    settings = [(args.workers, args.cache)]
    if args.compare:
        settings += [st for st in ((0, "none"), (0, "memory"), (1, "none"), (1, "memory"), (2, "memory"), (2, "none"))
                     if st not in settings]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_experiment(Path(tmp) / "data", args.stacks, args.frames, args.size, args.compress)
        res = measure(args, manifest, Path(tmp) / "out", settings)
    for k, v in res.items():
        print(f"{k}={v:.3f}" if k.startswith("eff") else f"{k}={v:.1f}")
    w, c = settings[0]
    peak = (f" peak_gpu_mem_gb={torch.cuda.max_memory_allocated() / 1e9:.2f}" if torch.cuda.is_available()
            and args.device != "cpu" else "")
    train_s = res[f"train_img_s[workers={w},cache={c}]"]
    vs_best = train_s / max(res["model_img_s"], res["model_img_s_all_cores"])
    print(f"pipeline_efficiency={res[f'efficiency[workers={w},cache={c}]']:.3f} vs_best_model={vs_best:.3f} "
          f"train_img_s={train_s:.1f} model_img_s={res['model_img_s']:.1f} "
          f"model_img_s_all_cores={res['model_img_s_all_cores']:.1f} infer_img_s={res['infer_img_s']:.1f}{peak}")


if __name__ == "__main__":
    main()
