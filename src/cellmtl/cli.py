"""The `cellmtl` command line (SPEC section 2).

Exit codes: 0 success, 2 bad input (one `error:` line naming the culprit, no traceback unless
`--debug`), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cellmtl import __version__
from cellmtl.errors import BadInputError, ExportError, TrainingError


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", type=Path, required=required, help="YAML config (SPEC section 4)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.epochs=3 (value parsed as YAML); repeatable",
    )


def cmd_synth(args: argparse.Namespace) -> int:
    from cellmtl.synth import write_experiment

    manifest = write_experiment(args.out, n_stacks=args.stacks, n_frames=args.frames, size=args.size, seed=args.seed)
    config = write_starter_config(manifest, Path(args.out) / "config.yaml")
    print(f"wrote {args.stacks} stacks and {manifest}", file=sys.stderr)
    print(f"train on it with: cellmtl train --config {config}", file=sys.stderr)
    print(manifest)
    return 0


def write_starter_config(manifest: Path, path: Path) -> Path:
    """A config next to synthetic data, so `synth` is followed by `check-data`/`train` at once."""
    import yaml

    from cellmtl.demo import DEMO_CONFIG
    from cellmtl.fileio import write_text

    raw = json.loads(json.dumps(DEMO_CONFIG))
    raw["data"]["manifest"] = str(Path(manifest).resolve())
    raw["experiment_name"] = "synthetic"
    raw["output_dir"] = "outputs"  # runs in outputs/synthetic/<run_id>, as the README shows (not the demo's folder)
    write_text(path, STARTER_HEADER + yaml.safe_dump(raw, sort_keys=False))
    return path


STARTER_HEADER = """\
# cellmtl starter config for the synthetic experiment beside it (every key: configs/multitask_example.yaml).
# Few wells of your own (under ~30 training stacks)? The time head needs pretrained features to transfer to
# new wells: start from ImageNet weights with a frozen-feature probe (docs/GUIDE.md, "Few wells? Start from
# pretrained weights"), e.g.
#   cellmtl train --config config.yaml --set model.name=mobilenet_v2 \\
#     --set model.weights=.weights/mobilenet_v2_imagenet.pt --set training.strategy=probe \\
#     --set multitask.time_head=per_class --set data.image_size=224
# (`make weights` writes that file offline; with internet, model.pretrained: true uses torchvision's own.)
"""


def cmd_train(args: argparse.Namespace) -> int:
    from cellmtl.config import load_config
    from cellmtl.training.run import train

    if args.config is None and args.resume is None:
        raise BadInputError("train needs --config CFG (or --resume RUN_DIR_OR_CKPT)")
    overrides = args.overrides + ([f"training.device={args.device}"] if args.device else [])
    cfg = None if args.resume is not None else load_config(args.config, overrides)
    run_dir = train(cfg, resume=args.resume, overrides=overrides)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0, not one per process
        print(run_dir)
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from cellmtl.config import load_config
    from cellmtl.cv import run_cv

    if args.config is None and args.resume is None:
        raise BadInputError("cv needs --config CFG --folds K (or --resume CV_DIR)")
    if args.resume is not None and (args.config is not None or args.overrides):
        raise BadInputError("cv --resume CV_DIR uses that cross-validation's own config; drop --config/--set")
    overrides = args.overrides + ([f"training.device={args.device}"] if args.device else [])
    cfg = None if args.resume is not None else load_config(args.config, overrides)
    print(run_cv(cfg, folds=args.folds, seeds=args.seeds, resume=args.resume))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cellmtl.compare import compare
    from cellmtl.config import load_config

    cfg = load_config(args.config, args.overrides + ([f"training.device={args.device}"] if args.device else []))
    print(compare(cfg, args.seeds, strategies=args.strategies))
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from cellmtl.config import load_config
    from cellmtl.data.check import check_data
    from cellmtl.errors import all_culprits

    cfg = load_config(args.config, args.overrides)
    report = check_data(cfg)
    print(report.text())  # the whole table first, even when some stacks cannot be read
    if report.errors:
        raise all_culprits(report.errors, "check-data")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from cellmtl.data.plate import PRESETS, write_manifest

    if args.pattern is not None and args.preset is not None:
        raise BadInputError("manifest takes --pattern PATTERN or --preset NAME, not both")
    pattern = args.pattern or (PRESETS[args.preset] if args.preset else None)
    channels = [c.strip() for c in args.channels.split(",") if c.strip()] if args.channels else None
    done = write_manifest(args.images, pattern, args.plate_map, args.out, channels=channels,
                          interval_hours=args.interval_hours, dry_run=args.dry_run)
    what = f"{done.n_stacks} stacks from {done.n_wells} wells"
    if done.frames is None:  # an OME-Zarr plate: its images keep their own frames and channel names
        print(f"{what} of the OME-Zarr plate", file=sys.stderr)
    else:
        lo, hi = done.frames
        print(f"{what}, {lo if lo == hi else f'{lo}-{hi}'} frames each; channels in this order: "
              f"{', '.join(done.channels)}{'' if args.channels else ' (sorted; --channels a,b sets the order)'}",
              file=sys.stderr)
    if args.dry_run:
        print(done.text, end="")
    else:
        print(args.out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cellmtl.evaluation.evaluate import evaluate_run

    out = evaluate_run(args.run, checkpoint=args.checkpoint, split=args.split, top_k=args.top_k, device=args.device)
    print(out)
    return 0


def stack_source(args: argparse.Namespace, command: str) -> dict:
    """The stacks and run options that `predict` and `explain` share; exactly one of --manifest or paths."""
    if (args.manifest is None) == (not args.paths):
        raise BadInputError(f"{command} needs either --manifest CSV or image paths, not both")
    return {"manifest": args.manifest, "paths": args.paths, "device": args.device, "batch_size": args.batch_size,
            "frame_interval_hours": args.frame_interval_hours}


def cmd_predict(args: argparse.Namespace) -> int:
    from cellmtl.predict import predict

    out = predict(args.checkpoint, out=args.out, maps=args.maps, **stack_source(args, "predict"))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line from rank 0 (which wrote the tables)
        print(out)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from cellmtl.explain import explain

    out = explain(args.checkpoint, out=args.out, frames=args.frames, **stack_source(args, "explain"))
    print(out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "onnx":
        from cellmtl.export.onnx import export_onnx as export
    else:
        from cellmtl.export.bioimageio import export_bioimageio as export
    print(export(args.checkpoint, args.out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cellmtl.demo import run_demo

    print(run_demo(Path(args.out), epochs=args.epochs))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellmtl",
        description="Predict from microscopy images whether cells are infected and the time since onset.",
    )
    parser.add_argument("--version", action="version", version=f"cellmtl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for bad input too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic infection time-lapse experiment (TIFFs + manifest.csv)")
    p.add_argument("--out", type=Path, required=True, help="folder to write into")
    p.add_argument("--stacks", type=int, default=12, help="number of stacks (half infected)")
    p.add_argument("--frames", type=int, default=24, help="frames per stack (1 h apart)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train a model from a YAML config; prints the run folder")
    _add_config_args(p, required=False)
    p.add_argument("--resume", type=Path, help="run folder or checkpoint to continue (same folder)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (same as --set training.device=...)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cv", help="grouped, stratified k-fold cross-validation; prints the cv folder")
    _add_config_args(p, required=False)
    p.add_argument("--folds", type=int, help="number of folds K (whole groups per fold, both classes in each)")
    p.add_argument("--seeds", type=int, default=1, help="train each fold with N seeds (config seed, +1, ...)")
    p.add_argument("--resume", type=Path, help="a cv folder to continue (only folds without results.json train)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (same as --set training.device=...)")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("evaluate", help="metrics and plots of a trained run on a split")
    p.add_argument("--run", type=Path, required=True, help="run folder")
    p.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint path")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--top-k", type=int, default=12,
                   help="error review: the K worst classification and K worst time predictions (errors_<split>.*)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (default: the run's training.device)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict infection and time for new stacks")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--manifest", type=Path, help="manifest CSV of the stacks (condition optional)")
    p.add_argument("paths", nargs="*", type=Path, help="stack files or folders (instead of --manifest)")
    p.add_argument("--out", type=Path, required=True, help="per-frame predictions CSV (and <stem>.stacks.csv; "
                   "with a well column <stem>.wells.csv and the plate view <stem>.plate.png)")
    p.add_argument("--maps", type=Path, help="folder for a map per stack: <stack_id>.tif (T x 2 x rows x cols: "
                   "prob_infected and time_hours per tile) and <stack_id>.png")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--frame-interval-hours", type=float, default=None,
                   help="for PATH inputs: hours between frames (default: the training config's)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="Grad-CAM heat maps per stack: PNG montages and index.html")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--manifest", type=Path, help="manifest CSV of the stacks (condition optional)")
    p.add_argument("paths", nargs="*", type=Path, help="stack files or folders (instead of --manifest)")
    p.add_argument("--out", type=Path, required=True, help="folder for <stack_id>.png montages and index.html")
    p.add_argument("--frames", type=int, nargs="+", metavar="N",
                   help="explain these frame numbers of every stack (default: each stack's most confident, "
                   "least confident and most wrong frames)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--frame-interval-hours", type=float, default=None,
                   help="for PATH inputs: hours between frames (default: the training config's)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", help="export a checkpoint for other tools (ONNX, bioimage.io)")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--format", choices=("onnx", "bioimageio"), required=True,
                   help="onnx: inputs normalised [N, C, H, W]; outputs prob_infected and time_hours. "
                   "bioimageio: a bioimage.io 0.5 model package (normalisation declared as preprocessing)")
    p.add_argument("--out", type=Path, required=True,
                   help="onnx: the .onnx file; bioimageio: a folder, or a .zip path for a zipped package")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="synth + train + evaluate with built-in defaults (minutes on a laptop CPU)")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epochs")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compare", help="multitask vs classification-only vs regression-only (and a classical "
                       "baseline) on one split; prints the folder with comparison.csv/.md")
    _add_config_args(p)
    p.add_argument("--seeds", type=int, default=1, help="seeds per mode: config seed, seed+1, ... (paired tests "
                   "need 2 or more)")
    p.add_argument("--strategies", nargs="+", metavar="S", default=None,
                   help="compare training strategies on the config's task instead of task modes: scratch (the same "
                   "network from random weights), finetune, probe, lp_ft; e.g. --strategies scratch probe lp_ft")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (same as --set training.device=...)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("manifest", help="write a manifest from per-image files (plate imagers) and a plate map")
    p.add_argument("--images", type=Path, required=True,
                   help="folder of the exported images (searched recursively), or an OME-Zarr HCS plate")
    p.add_argument("--pattern", help="the parts of a file name, e.g. 'P1_{well}_{field}_{channel}_{time}.tif'; parts: "
                   "{plate} {well} (or {row} {col}) {field} {channel} {time} {plane} {*}; {time} reads 00d12h30m, 12h, "
                   "12.5h, 90min, or a frame index t012 (with --interval-hours)")
    p.add_argument("--preset", choices=("incucyte", "imagexpress", "operetta", "cellvoyager"),
                   help="the file names of a plate imager's export instead of --pattern (see the guide)")
    p.add_argument("--plate-map", type=Path, required=True,
                   help="CSV/xlsx, one row per well: a 'well' column (B2, B02, b2) and any others (condition, "
                   "infection_onset_hour, moi, ...), copied into every stack of that well")
    p.add_argument("--out", type=Path, required=True, help="the manifest CSV to write (its stacks go beside it)")
    p.add_argument("--channels", help="channel names in the order the model reads them, comma-separated "
                   "(default: sorted)")
    p.add_argument("--interval-hours", type=float, help="hours between frames when {time} is a frame index")
    p.add_argument("--dry-run", action="store_true", help="print the manifest it would write; write nothing")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("check-data", help="read every stack of a config; report counts, shapes, times, problems")
    _add_config_args(p)
    p.set_defaults(func=cmd_check_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Idle OpenMP threads sleep instead of spinning, so they do not steal the cores that DataLoader
    # workers need. Must be set before torch is first imported (commands import it lazily).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Our own loggers speak at INFO; libraries (the ONNX exporter's optimiser, for one) only from WARNING,
    # so a command's stderr holds what the user needs to read.
    logging.basicConfig(format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("cellmtl").setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except BadInputError as exc:
        if args.debug:
            raise
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except (TrainingError, ExportError) as exc:
        if args.debug:
            raise
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
