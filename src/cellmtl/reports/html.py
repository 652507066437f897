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
CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:.6em 0}.card{border:1px solid #ccc;border-radius:6px;
padding:.5em .9em;min-width:10em}.card .v{font-size:1.6em;font-weight:600}.card .l{font-size:.85em;color:#555}
.note{background:#fff6e0;border-left:4px solid #e0a000;padding:.5em .8em;margin:.5em 0}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}figure{display:inline-block;margin:.4em;vertical-align:top}
figure img{max-width:560px;border:1px solid #eee}figure.wide img{max-width:100%}
figcaption{font-size:.85em;color:#555}pre{background:#f6f6f6;padding:1em;overflow:auto}"""

# Plot files by what they show, in the order the report shows them; an evaluation's own plot replaces the one
# training wrote for the same split, so no figure appears twice.
KEY_PLOTS = (("roc.png", "ROC curve: how well prob_infected separates infected from mock frames"),
             ("time_scatter.png", "Predicted vs true time, per frame"),
             ("onset_per_stack.png", "Estimated vs true infection onset, per stack"),
             ("plate.png", "Plate view: wells by infection probability and onset"))
DETAIL_PLOTS = (("metrics_vs_time.png", "AUC and time MAE by hours since start"),
                ("confusion_matrix.png", "Confusion matrix at prob_infected 0.5"))


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
    """One number format for the page: three decimals (two for hours, shown with their unit elsewhere)."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table; every cell escaped."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def _figure(png: Path, caption: str, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return (f'<figure{cls}><img src="{data_uri(png)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _card(label: str, value: str, detail: str = "") -> str:
    extra = f'<div class="l">{html.escape(detail)}</div>' if detail else ""
    return (f'<div class="card"><div class="l">{html.escape(label)}</div><div class="v">{html.escape(value)}</div>'
            f"{extra}</div>")


def headline_section(results: dict[str, Any] | None, ev: dict[str, Any] | None) -> str:
    """The answer first: infection AUC and time MAE (with 95% CIs when an evaluation exists) and the notes that
    say when not to trust them."""
    metrics = (ev or {}).get("metrics") or (results or {}).get("best") or {}
    ci = (ev or {}).get("ci95_bootstrap_over_stacks") or {}

    def with_ci(key: str, hours: bool) -> tuple[str, str]:
        v = metrics.get(key)
        if v is None:
            return "n/a", ""
        unit = " h" if hours else ""
        text = f"{v:.2f}{unit}" if hours else f"{v:.3f}"
        lo_hi = ci.get(key)
        return text, (f"95% CI {lo_hi[0]:.2f}-{lo_hi[1]:.2f}{unit}" if hours else
                      f"95% CI {lo_hi[0]:.3f}-{lo_hi[1]:.3f}") if lo_hi else ""

    where = f"{(ev or {}).get('split', 'val')} split" + (", bootstrap over stacks" if ci else "")
    cards = [_card("Infection: ROC AUC", *with_ci("cls_auc", False)),
             _card("Time: MAE", *with_ci("reg_mae", True)),
             _card("Time MAE, infected", *with_ci("reg_mae_infected", True)),
             _card("Time MAE, mock", *with_ci("reg_mae_uninfected", True))]
    slope = metrics.get("reg_slope_infected")
    if slope is not None:
        cards.append(_card("Time slope in infected stacks", f"{slope:.2f}", "1 = follows the clock"))
    if results and results.get("best_epoch") is not None:
        cards.append(_card("Best epoch", f"{results['best_epoch']} of {results.get('history_length')}",
                           f"by {results.get('select_metric')}"))
    notes = [results.get(k) for k in ("time_note", "selection_note")] if results else []
    notes_html = "".join(f'<p class="note">{html.escape(str(n))}</p>' for n in notes if n)
    return (f'<section id="headline"><h2>At a glance ({html.escape(where)})</h2><div class="cards">{"".join(cards)}'
            f"</div>{notes_html}</section>")


def _plot_dirs(run_dir: Path) -> list[Path]:
    """Where a split's plots are, best first: the latest evaluation's, then training's own."""
    dirs = [d for d in (run_dir / "plots" / "evaluation_val", run_dir / "plots" / "evaluation_test") if d.is_dir()]
    return dirs + [run_dir / "plots"]


def plots_sections(run_dir: Path) -> tuple[str, str, str, set[Path]]:
    """(key plots, learning curves, detail plots) HTML and the PNGs they show; each figure once."""
    shown: set[Path] = set()

    def pick(name: str) -> Path | None:
        for d in _plot_dirs(run_dir):
            if (d / name).is_file():
                return d / name
        return None

    def figures(specs: tuple[tuple[str, str], ...]) -> list[str]:
        out = []
        for name, caption in specs:
            png = pick(name)
            if png is not None:
                out.append(_figure(png, caption))
                shown.add(png)
        return out

    key = figures(KEY_PLOTS)
    maps_dir = next((d / "maps" for d in _plot_dirs(run_dir) if (d / "maps").is_dir()), None)
    for png in sorted(maps_dir.glob("*.png"))[:3] if maps_dir else []:
        key.append(_figure(png, f"Tile map: {png.stem}", wide=True))
        shown.add(png)
    curves = pick("learning_curves.png") if (run_dir / "plots" / "learning_curves.png").is_file() else None
    curves_html = _figure(curves, "Learning curves", wide=True) if curves else ""
    shown |= {curves} if curves else set()
    detail = figures(DETAIL_PLOTS)
    return "".join(key), curves_html, "".join(detail), shown


def results_section(results: dict[str, Any]) -> str:
    """Best (val at the selected epoch), final (val at the last epoch) and test metrics side by side."""
    cols = [c for c in ("best", "final", "test") if isinstance(results.get(c), dict)]
    names = [n for n in (*LOSS_NAMES, *METRIC_NAMES, *SLOPE_METRICS) if any(n in results[c] for c in cols)]
    rows = [[n, *(results[c].get(n) for c in cols)] for n in names]
    head = (f"<p>best epoch {html.escape(_fmt(results.get('best_epoch')))} of "
            f"{html.escape(_fmt(results.get('history_length')))} by {html.escape(_fmt(results.get('select_metric')))}"
            f"; training wall time {html.escape(_fmt(results.get('wall_time_s')))} s</p>")
    return "<h2>Training results, metric by metric</h2>" + head + _table(["metric", *cols], rows)


def evaluation_section(ev: dict[str, Any]) -> str:
    """Metrics with bootstrap CIs, the 3-hour time bins and the per-stack table of one evaluation JSON."""
    ci = ev.get("ci95_bootstrap_over_stacks") or {}
    metrics = ev.get("metrics") or {}
    rows = [[k, v, *(ci[k] if ci.get(k) else (None, None))] for k, v in metrics.items()]
    out = [
        f"<h2>Evaluation of the {html.escape(str(ev.get('split')))} split, in detail</h2>",
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


def config_section(cfg: dict[str, Any]) -> str:
    rows = [[k, _get(cfg, k)] for k in SUMMARY_KEYS if _get(cfg, k) is not None]
    full = html.escape(yaml.safe_dump(cfg, sort_keys=False))
    return ("<h2>Configuration</h2>" + _table(["key", "value"], rows)
            + f"<details><summary>full resolved config</summary><pre>{full}</pre></details>")


def run_pngs(run_dir: Path) -> list[Path]:
    """Every plot of a run: PNGs in the run folder itself and anywhere under plots/."""
    under = sorted((run_dir / "plots").rglob("*.png")) if (run_dir / "plots").is_dir() else []
    return sorted(run_dir.glob("*.png")) + under


def render_report(run_dir: Path) -> str:
    """The report's HTML for a run folder: the headline and key plots first, then learning curves, details,
    other plots, the metric tables and the config; sections whose files are missing are left out."""
    run_dir = Path(run_dir)
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    title = f"cellmtl run {cfg.get('experiment_name', '')}/{run_dir.name}"
    results = _read_json(run_dir / "results.json")
    evals = [ev for ev in (_read_json(run_dir / f"evaluation_{sp}.json") for sp in ("val", "test")) if ev]
    key, curves, detail, shown = plots_sections(run_dir)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if results or evals:
        parts.append(headline_section(results, evals[0] if evals else None))
    parts.append("<h2>Key plots</h2>" + (key or "<p>no plots in this run folder</p>"))
    if curves:
        parts.append("<h2>Learning curves</h2>" + curves)
    errors = sorted(run_dir.glob("errors_*.png"))
    shown |= set(errors)
    shown_names = {p.name for p in shown}  # training's roc.png beside the evaluation's: the same figure, once
    others = [p for p in run_pngs(run_dir) if p not in shown and p.name not in shown_names
              and p.parent.name != "maps"]
    if detail or errors or others:
        parts.append("<h2>More plots</h2>" + detail
                     + "".join(_figure(p, f"Worst frames ({p.stem.removeprefix('errors_')} split)", wide=True)
                               for p in errors)
                     + "".join(_figure(p, p.stem.replace("_", " ")) for p in others))
    for ev in evals:
        parts.append(evaluation_section(ev))
    if results:
        parts.append(results_section(results))
    if cfg:
        parts.append(config_section(cfg))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(run_dir: str | Path) -> Path:
    """(Re)write `run_dir/report.html` atomically; returns its path."""
    run_dir = Path(run_dir)
    out = run_dir / "report.html"
    write_text(out, render_report(run_dir))
    return out
