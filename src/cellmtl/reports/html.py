"""`report.html`: one self-contained page per run folder, written by `train` and refreshed by `evaluate`.

Everything comes from the files already in the run folder (config.yaml, results.json, evaluation_<split>.json,
plots/**/*.png and PNGs beside them), so the report can be rebuilt at any time and never disagrees with them.
Plots are embedded as base64 data URIs and there is no script, stylesheet or font from elsewhere: the page opens
from disk with no server and survives being moved, zipped or emailed.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import yaml

from cellmtl.fileio import write_text
from cellmtl.metrics import LOSS_NAMES, METRIC_NAMES, SLOPE_METRICS

SUMMARY_KEYS = (
    "experiment_name",
    "seed",
    "data.manifest",
    "data.channels",
    "data.image_size",
    "data.pre_onset",
    "data.normalization.mode",
    "model.name",
    "model.pretrained",
    "model.weights",
    "training.strategy",
    "task.mode",
    "multitask.classification_weight",
    "multitask.regression_weight",
    "training.epochs",
    "training.batch_size",
    "training.select_metric",
    "optimizer.lr",
)
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}figure{display:inline-block;margin:.5em;vertical-align:top}
img{max-width:520px;border:1px solid #eee}figcaption{font-size:.85em;color:#555}pre{background:#f6f6f6;padding:1em}"""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table; every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def config_section(cfg: dict[str, Any]) -> str:
    rows = [[k, _get(cfg, k)] for k in SUMMARY_KEYS if _get(cfg, k) is not None]
    full = html.escape(yaml.safe_dump(cfg, sort_keys=False))
    return ("<h2>Configuration</h2>" + _table(["key", "value"], rows)
            + f"<details><summary>full resolved config</summary><pre>{full}</pre></details>")


def results_section(results: dict[str, Any]) -> str:
    """Best (val at the selected epoch), final (val at the last epoch) and test metrics side by side."""
    cols = [c for c in ("best", "final", "test") if isinstance(results.get(c), dict)]
    names = [n for n in (*LOSS_NAMES, *METRIC_NAMES, *SLOPE_METRICS) if any(n in results[c] for c in cols)]
    rows = [[n, *(results[c].get(n) for c in cols)] for n in names]
    head = (f"<p>best epoch {html.escape(_fmt(results.get('best_epoch')))} of "
            f"{html.escape(_fmt(results.get('history_length')))} by {html.escape(_fmt(results.get('select_metric')))}"
            f"; training wall time {html.escape(_fmt(results.get('wall_time_s')))} s</p>")
    for key in ("selection_note", "time_note"):
        if results.get(key):
            head += f"<p><strong>{html.escape(str(results[key]))}</strong></p>"
    return "<h2>Training results</h2>" + head + _table(["metric", *cols], rows)


def evaluation_section(ev: dict[str, Any]) -> str:
    """Metrics with bootstrap CIs, the 3-hour time bins and the per-stack table of one evaluation JSON."""
    ci = ev.get("ci95_bootstrap_over_stacks") or {}
    metrics = ev.get("metrics") or {}
    rows = [[k, v, *(ci[k] if ci.get(k) else (None, None))] for k, v in metrics.items()]
    out = [
        f"<h2>Evaluation: {html.escape(str(ev.get('split')))}</h2>",
        f"<p>{html.escape(Path(str(ev.get('checkpoint'))).name)}, epoch {html.escape(_fmt(ev.get('epoch')))}, "
        f"{html.escape(_fmt(ev.get('n_frames')))} frames, {html.escape(_fmt(ev.get('n_stacks')))} stacks; "
        "95% CIs by bootstrap over stacks</p>",
        _table(["metric", "value", "CI low", "CI high"], rows),
    ]
    bins = ev.get("time_bins_3h") or []
    if bins:
        keys = ["n", "cls_auc", "cls_acc", "reg_mae", "reg_mae_infected", "reg_mae_uninfected"]
        out.append("<h3>By hours since start (3 h bins)</h3>")
        out.append(_table(["hours", *keys], [[f"{b['hour_start']:g}-{b['hour_end']:g}", *(b.get(k) for k in keys)]
                                             for b in bins]))
        out.append(f"<p>AUC &ge; 0.99 in two consecutive bins from hour "
                   f"{html.escape(_fmt(ev.get('earliest_hour_auc_ge_0.99_two_bins')))}</p>")
    per_stack = ev.get("per_stack") or []
    if per_stack:
        keys = [k for k in per_stack[0] if k != "stack_id"]
        out.append("<h3>Per stack</h3>")
        out.append(_table(["stack_id", *keys], [[r.get("stack_id"), *(r.get(k) for k in keys)] for r in per_stack]))
    return "".join(out)


def run_pngs(run_dir: Path) -> list[Path]:
    """Every plot of a run: PNGs in the run folder itself and anywhere under plots/."""
    under = sorted((run_dir / "plots").rglob("*.png")) if (run_dir / "plots").is_dir() else []
    return sorted(run_dir.glob("*.png")) + under


def plots_section(run_dir: Path) -> str:
    """Every plot of the run, grouped by folder, embedded."""
    pngs = run_pngs(run_dir)
    out, group = ["<h2>Plots</h2>"], None
    for png in pngs:
        rel = png.relative_to(run_dir)
        if rel.parent != group:
            group = rel.parent
            out.append(f"<h3>{html.escape(str(group) if str(group) != '.' else 'run folder')}</h3>")
        out.append(f'<figure><img src="{data_uri(png)}" alt="{html.escape(png.stem)}">'
                   f"<figcaption>{html.escape(str(rel))}</figcaption></figure>")
    if not pngs:
        out.append("<p>no plots in this run folder</p>")
    return "".join(out)


def render_report(run_dir: Path) -> str:
    """The report's HTML for a run folder; sections whose files are missing are left out."""
    run_dir = Path(run_dir)
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    title = f"cellmtl run {cfg.get('experiment_name', '')}/{run_dir.name}"
    parts = [f"<h1>{html.escape(title)}</h1>", config_section(cfg) if cfg else ""]
    results = _read_json(run_dir / "results.json")
    if results:
        parts.append(results_section(results))
    for split in ("val", "test"):
        ev = _read_json(run_dir / f"evaluation_{split}.json")
        if ev:
            parts.append(evaluation_section(ev))
    parts.append(plots_section(run_dir))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """(Re)write `run_dir/report.html` atomically; returns its path."""
    run_dir = Path(run_dir)
    out = run_dir / "report.html"
    write_text(out, render_report(run_dir))
    return out
