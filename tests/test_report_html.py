"""report.html: self-contained (plots as data URIs, nothing fetched), and every image loads in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from cellmtl.reports.html import render_report, write_report  # noqa: E402
from cellmtl.reports.plots import plot_time_bins, write_run_plots  # noqa: E402

# Recorded into the DOM on `load`, when every <img> has decoded or failed; --dump-dom prints the result.
IMG_PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.map(i => i.complete && i.naturalWidth > 0 ? 1 : 0);
  const top = e => e ? Math.round(e.getBoundingClientRect().top + window.scrollY) : null;
  const layout = {headline: top(document.getElementById('headline')), imgs: imgs.map(top),
                  h2: [...document.querySelectorAll('h2')].map(h => [h.textContent, top(h)]),
                  unique: new Set(imgs.map(i => i.src)).size};
  const p = document.createElement('pre'); p.id = 'img-probe'; p.textContent = JSON.stringify(ok);
  const q = document.createElement('pre'); q.id = 'layout-probe'; q.textContent = JSON.stringify(layout);
  document.body.appendChild(p); document.body.appendChild(q);
});</script>"""


def chromium() -> str:
    """The Chromium binary; skips the test when there is none, except under CI (env CI set), where a missing
    browser must fail the run rather than silently drop the check (.ci/run installs it)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium not found but CI is set: .ci/run must install it (apt-get install chromium)")
        pytest.skip("chromium not installed (Debian: apt-get install chromium); report rendering not checked")
    return exe


def render(html_file: Path, tmp_path: Path) -> tuple[list[int], dict]:
    """(1/0 per <img>, layout) of the page as Chromium rendered it from disk (file://, no server) in a
    1280 x 2000 px window: tops (px) of the headline, of every image and of every section title."""
    probe = tmp_path / "probe" / html_file.name
    probe.parent.mkdir(exist_ok=True)
    probe.write_text(html_file.read_text().replace("</body>", IMG_PROBE + "</body>"))
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000",
         "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r'<pre id="img-probe">(\[.*?\])</pre>', proc.stdout)
    layout = re.search(r'<pre id="layout-probe">(.*?)</pre>', proc.stdout)
    assert found and layout, f"no probe result from chromium (rc {proc.returncode}): {proc.stderr[-500:]}"
    return json.loads(found.group(1)), json.loads(layout.group(1).replace("&amp;", "&"))


def images_loaded(html_file: Path, tmp_path: Path) -> list[int]:
    return render(html_file, tmp_path)[0]


def fake_run(run: Path) -> Path:
    """A run folder with the files train and evaluate write, and real plots from cellmtl.reports.plots."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"experiment_name": "demo <&>", "seed": 3,
                                                     "model": {"name": "resnet18"}, "task": {"mode": "multitask"}}))
    metrics = {"total_loss": 0.5, "cls_auc": 0.9, "cls_acc": 0.8, "reg_mae": 2.5, "reg_mae_infected": None,
               "reg_slope_infected": 0.0625}
    (run / "results.json").write_text(json.dumps({"best_epoch": 2, "history_length": 3, "select_metric": "cls_auc",
                                                  "selection_note": "note: best.pt is epoch 2 by cls_auc <x>",
                                                  "time_note": "note: inside the val infected stacks <y>",
                                                  "best": metrics, "final": metrics, "test": metrics}))
    rng = np.random.default_rng(0)
    infected = np.array([0, 1] * 10)
    arrays = {"infected": infected, "prob": np.clip(infected * 0.6 + rng.random(20) * 0.4, 0, 1),
              "time_true": rng.random(20) * 10, "time_pred": rng.random(20) * 10, "time_mask": np.ones(20, bool)}
    history = [{"epoch": e, "train_total_loss": 1.0 / e, "val_total_loss": 1.2 / e, "val_cls_auc": 0.5 + 0.1 * e,
                "val_reg_mae": 5.0 - e} for e in (1, 2, 3)]
    write_run_plots(run, history, arrays)
    plot_time_bins([{"hour_start": 0.0, "hour_end": 3.0, "n": 4, "cls_auc": 0.5}], run / "errors_val.png")  # a PNG
    # beside the run's files, as evaluate's error review writes
    bins = [{"hour_start": 0.0, "hour_end": 3.0, "n": 10, "cls_auc": 0.8, "cls_acc": 0.7, "reg_mae": 2.0,
             "reg_mae_infected": 1.5, "reg_mae_uninfected": 2.5},
            {"hour_start": 3.0, "hour_end": 6.0, "n": 10, "cls_auc": 1.0, "cls_acc": 0.9, "reg_mae": 1.0,
             "reg_mae_infected": 0.5, "reg_mae_uninfected": None}]
    plot_time_bins(bins, run / "plots" / "evaluation_val" / "metrics_vs_time.png")
    (run / "evaluation_val.json").write_text(json.dumps({
        "split": "val", "checkpoint": str(run / "checkpoints" / "best.pt"), "epoch": 2, "n_frames": 20,
        "n_stacks": 2, "metrics": metrics, "ci95_bootstrap_over_stacks": {"cls_auc": [0.7, 1.0]},
        "time_bins_3h": bins, "earliest_hour_auc_ge_0.99_two_bins": None,
        "per_stack": [{"stack_id": "s1", "condition": "infected", "n": 10, "cls_acc": 1.0, "reg_mae": 1.2}]}))
    return run


def test_report_is_self_contained_and_complete(tmp_path):
    run = fake_run(tmp_path / "run")
    page = render_report(run)
    srcs = re.findall(r'<img src="(data:image/png;base64,[^"]+)"', page)
    assert len(srcs) >= 5 and len(set(srcs)) == len(srcs), "every figure once"
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not load anything from elsewhere"
    assert "demo &lt;&amp;&gt;" in page and "<&>" not in page.split("<style>")[0]  # escaped
    for text in ("At a glance", "Key plots", "Learning curves", "Configuration", "Training results",
                 "Evaluation of the val split", "95% CI 0.700-1.000", "Per stack", "s1", "best epoch 2",
                 "Worst frames (val split)", "note: best.pt is epoch 2 by cls_auc &lt;x&gt;",
                 "note: inside the val infected stacks &lt;y&gt;", "reg_slope_infected", "2.50 h"):
        assert text in page, text
    order = [page.index(t) for t in ("At a glance", "Key plots", "Learning curves", "Evaluation of the val split",
                                     "Training results", "Configuration")]
    assert order == sorted(order), "the answer first, the config last"
    # the evaluation's own ROC replaces training's: one ROC on the page
    assert page.count("<figcaption>ROC curve") == 1


def test_report_renders_in_chromium_with_every_image(tmp_path):
    run = fake_run(tmp_path / "run")
    report = write_report(run)
    moved = tmp_path / "elsewhere" / "report.html"  # no run folder beside it: nothing may be relative
    moved.parent.mkdir()
    shutil.move(report, moved)
    loaded, layout = render(moved, tmp_path)
    assert len(loaded) >= 5 and all(loaded), loaded
    assert layout["unique"] == len(loaded), "no figure twice"
    assert layout["headline"] is not None and layout["headline"] < min(layout["imgs"])  # the answer first
    assert sum(1 for t in layout["imgs"] if t < 2000) >= 2, layout  # and plots on the first screen


def test_report_of_an_empty_folder_still_renders(tmp_path):
    (tmp_path / "r").mkdir()
    assert "no plots" in render_report(tmp_path / "r")
