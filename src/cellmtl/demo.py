"""`cellmtl demo`: synth -> train -> evaluate (val) -> summary, sized to finish in minutes on a laptop CPU.

`DEMO_CONFIG` is the same content as `configs/demo.yaml` (a test keeps them equal), held in code so an
installed package can run the demo without the repository.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cellmtl.config import config_from_dict
from cellmtl.evaluation.evaluate import evaluate_run
from cellmtl.training.run import train

DEMO_SYNTH = {"n_stacks": 12, "n_frames": 24, "size": 96, "seed": 0}

DEMO_CONFIG: dict[str, Any] = {
    "experiment_name": "demo",
    "output_dir": "outputs/demo/runs",
    "seed": 42,
    "data": {
        "manifest": "outputs/demo/data/manifest.csv",
        "val_fraction": 0.34,
        "frame_interval_hours": 1.0,
        "channels": None,
        "image_size": 64,
        "pre_onset": "drop",
        "num_workers": 1,
    },
    "model": {"name": "resnet18", "pretrained": False},
    "task": {"mode": "multitask"},
    "multitask": {"infection_onset_hour": 0.0, "classification_weight": 1.0, "regression_weight": 1.0},
    "training": {"epochs": 10, "batch_size": 32, "select_metric": "cls_auc"},
    "optimizer": {"lr": 0.001},
}


def run_demo(out: Path, *, epochs: int | None = None) -> Path:
    """Write the synthetic experiment into `out/data`, train into `out/runs`, evaluate best.pt on the val split
    (the SPEC's demo; it gives the report its bootstrap intervals and the error review), print a summary;
    returns the run folder."""
    from cellmtl.synth import write_experiment

    out = Path(out)
    manifest = write_experiment(out / "data", **DEMO_SYNTH)
    raw = json.loads(json.dumps(DEMO_CONFIG))
    raw["data"]["manifest"] = str(manifest)
    raw["output_dir"] = str(out / "runs")
    if epochs is not None:
        raw["training"]["epochs"] = epochs
    cfg = config_from_dict(raw, "demo defaults")
    run_dir = train(cfg)
    evaluate_run(run_dir, checkpoint="best", split="val")
    results = json.loads((run_dir / "results.json").read_text())
    print(summary(results, run_dir), file=sys.stderr)
    return run_dir


def _fmt(v: Any, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:.3f}{unit}"


def summary(results: dict[str, Any], run_dir: Path) -> str:
    best = results["best"]
    return "\n".join(
        [
            "",
            "cellmtl demo finished",
            f"  best epoch         {results['best_epoch']} of {results['history_length']}",
            f"  val cls_auc        {_fmt(best.get('cls_auc'))}",
            f"  val cls_acc        {_fmt(best.get('cls_acc'))}",
            f"  val reg_mae        {_fmt(best.get('reg_mae'), ' h')}"
            f"  (infected {_fmt(best.get('reg_mae_infected'), ' h')}, "
            f"uninfected {_fmt(best.get('reg_mae_uninfected'), ' h')})",
            f"  wall time          {results['wall_time_s']:.0f} s",
            f"  run folder         {run_dir}",
            f"  report             {run_dir / 'report.html'}",
            f"  plots              {run_dir / 'plots'}",
            f"  predictions        {run_dir / 'predictions_val.csv'}",
            "",
        ]
    )
