"""`cellmtl explain`: Grad-CAM heat maps of where the model looks, per stack, as PNG montages + index.html.

Grad-CAM (Selvaraju et al., 2017): the last shared block's activations `A [K, h, w]`, weighted by the
spatial mean of the gradient of one output with respect to them, summed over `K`, ReLU, upsampled to the
input and scaled to [0, 1]. The last shared block (`backbone.layer4` of every torchvision ResNet) is the
last place both heads read from, so the classification and time maps are comparable. Its resolution is
the input side / 32 (4 x 4 at 128 px): a coarse map, which says which region, not which pixel.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.patches import Patch
from torch import nn

from cellmtl.data.tiles import TileSpec, grid_tiles, tile_grid
from cellmtl.errors import BadInputError
from cellmtl.fileio import file_stem, write_text
from cellmtl.models import MultiTaskNet
from cellmtl.reports.images import composite


def target_layer(model: MultiTaskNet) -> nn.Module:
    """The last shared block with spatial maps (`backbone.layer4` of ResNets; `MultiTaskNet.feature_layer`)."""
    try:
        return model.feature_layer()
    except BadInputError as exc:
        raise BadInputError(f"explain: model {model.spec.name!r}: {exc}") from None


def grad_cam(model: MultiTaskNet, x: torch.Tensor, head: str, sign: torch.Tensor | None = None,
             normalise: bool = True) -> torch.Tensor:
    """x `[B, C, H, W]` float32 -> heat maps `[B, H, W]` float32 in [0, 1] for output `head` ("infected"
    logit or "time"), each map scaled by its own maximum (all zeros when nothing supports the output).
    `sign` `[B]` (+1/-1) flips the output per sample, e.g. to explain the evidence for "uninfected"."""
    layer = target_layer(model)
    store: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        store["act"] = out
        out.register_hook(lambda grad: store.__setitem__("grad", grad))

    handle = layer.register_forward_hook(keep)
    model.eval()  # BatchNorm in eval mode: samples are independent, so one backward gives per-sample maps
    try:
        with torch.enable_grad():
            out = model(x)[head].float()
            if sign is not None:
                out = out * sign.to(out)
            out.sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    act, grad = store["act"].detach().float(), store["grad"].detach().float()
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    if not normalise:  # tiles of one frame: scaled together by the caller
        return cam
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam)).clamp(0.0, 1.0)


def frame_cam(model: MultiTaskNet, image: torch.Tensor, head: str, sign: torch.Tensor | None, tiles: TileSpec | None,
              device: torch.device, chunk: int = 32) -> np.ndarray:
    """One frame's Grad-CAM map `[H, W]`, unscaled (the caller scales a stack's maps together). With tiles,
    every tile of the grid is explained as the model saw it and the tile maps are placed where the tiles lie
    (overlaps averaged), so tiles compare with each other."""
    if tiles is None:
        return grad_cam(model, image[None].to(device), head, sign, normalise=False).cpu().numpy()[0]
    grid, (rows, cols) = grid_tiles(image, tiles)
    ys, xs = tile_grid(image.shape[1], image.shape[2], tiles)
    parts = []
    for start in range(0, grid.shape[0], chunk):
        batch = grid[start:start + chunk].to(device)
        parts.append(grad_cam(model, batch, head, None if sign is None else sign.expand(batch.shape[0]),
                              normalise=False).cpu())
    maps = torch.cat(parts)
    total = torch.zeros(image.shape[1:])
    count = torch.zeros(image.shape[1:])
    size = tiles.size
    for k, (y, x) in enumerate((y, x) for y in ys for x in xs):
        h, w = total[y:y + size, x:x + size].shape
        total[y:y + size, x:x + size] += maps[k, :h, :w]
        count[y:y + size, x:x + size] += 1
    return (total / count.clamp_min(1)).numpy()


def pick_frames(
    prob: np.ndarray | None, infected: np.ndarray, time_err: np.ndarray | None, threshold: float = 0.5
) -> dict[int, list[str]]:
    """Positions (within one stack's frames) -> roles. With a classifier: most confident and least
    confident (|prob - threshold| largest and smallest) and, where labels are known, most wrong
    (|prob - label| largest). Without one: first, middle and last frame and, where time targets are known,
    the largest time error."""
    roles: dict[int, list[str]] = {}
    n = len(infected)
    if prob is not None:
        margin = np.abs(prob - threshold)
        roles.setdefault(int(np.argmax(margin)), []).append("most confident")
        roles.setdefault(int(np.argmin(margin)), []).append("least confident")
        known = np.flatnonzero(infected >= 0)
        if len(known):
            roles.setdefault(int(known[np.argmax(np.abs(prob[known] - infected[known]))]), []).append("most wrong")
    else:
        for pos, role in ((0, "first"), (n // 2, "middle"), (n - 1, "last")):
            roles.setdefault(pos, []).append(role)
        if time_err is not None and np.isfinite(time_err).any():
            roles.setdefault(int(np.nanargmax(time_err)), []).append("largest time error")
    return dict(sorted(roles.items()))


def plot_montage(
    rows: Sequence[dict], path: Path, heads: Sequence[str], channel_names: Sequence[str]
) -> Path:
    """One row per frame: the input channels (a legend names each channel's colour), then each head's heat map
    over them, with a colour bar (the maps of one stack share one scale, so its frames compare)."""
    from cellmtl.reports.images import CHANNEL_COLORS
    from cellmtl.reports.plots import new_figure, save_laid_out

    titles = {"infected": "Grad-CAM: infection", "time": "Grad-CAM: time"}
    ncols = 1 + len(heads)
    fig = new_figure(2.8 * ncols + 0.9, 2.8 * len(rows) + 0.6)
    shown = None
    for r, row in enumerate(rows):
        rgb = composite(row["image"])
        for c in range(ncols):
            ax = fig.add_subplot(len(rows), ncols, r * ncols + c + 1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.imshow(rgb, interpolation="nearest")
            if c == 0:
                ax.set_title(row["caption"], fontsize=7, loc="left")
            else:
                shown = ax.imshow(row["cams"][heads[c - 1]], cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0,
                                  interpolation="bilinear")
                ax.set_title(titles[heads[c - 1]], fontsize=8)
    n = len(channel_names)
    colours = ["#808080"] if n == 1 else [CHANNEL_COLORS[k % len(CHANNEL_COLORS)] for k in range(n)]
    handles = [Patch(color=colours[k if n > 1 else 0], label=name) for k, name in enumerate(channel_names)]
    fig.legend(handles=handles, loc="upper left", ncol=min(n, 4), fontsize=8, frameon=False,
               title="image channels", title_fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.86, top=1 - 0.85 / (2.8 * len(rows) + 0.6), bottom=0.02, wspace=0.05,
                        hspace=0.35)
    if shown is not None:
        bar = fig.colorbar(shown, cax=fig.add_axes((0.89, 0.1, 0.02, 0.7)))
        bar.set_label("Grad-CAM evidence (0 to the stack's maximum)", fontsize=8)
    return save_laid_out(fig, path, dpi=110)


def caption(sid: str, frame: int, hours: float, roles: list[str], prob: float | None, t_pred: float | None,
            label: int, t_true: float) -> str:
    parts = [f"{sid} frame {frame} ({hours:g} h): {', '.join(roles)}"]
    pred = []
    if prob is not None:
        pred.append(f"p(inf)={prob:.2f}")
    if t_pred is not None:
        pred.append(f"time {t_pred:.1f} h")
    truth = [] if label < 0 else ["infected" if label == 1 else "uninfected"]
    if np.isfinite(t_true):
        truth.append(f"{t_true:g} h")
    parts.append("pred " + ", ".join(pred))
    if truth:
        parts.append("true " + ", ".join(truth))
    return "\n".join(parts)


def write_index(out: Path, entries: Sequence[dict]) -> Path:
    """index.html: one section per stack with its montage and the frames shown."""
    parts = ["<!doctype html><meta charset='utf-8'><title>cellmtl explain</title>",
             "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%}td,th{padding:2px 8px}</style>",
             "<h1>cellmtl explain: Grad-CAM on the last shared block</h1>",
             "<p>Red = regions that raise the output (infection: evidence for the predicted class; time: "
             "evidence for a later time). The maps of one stack share one scale (its maximum), shown by the colour "
             "bar; the legend names each image channel's colour.</p>"]
    views = [(name, title) for name, title in (("plate.png", "Plate view"), ("onset_per_stack.png",
                                                                                "Onset per stack"))
             if (out / name).is_file()]
    parts += [f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(title)}'>" for name, title in views]
    parts.append("<ul>")
    parts += [f"<li><a href='#{html.escape(e['anchor'])}'>{html.escape(e['stack_id'])}</a></li>" for e in entries]
    parts.append("</ul>")
    for e in entries:
        parts.append(f"<h2 id='{html.escape(e['anchor'])}'>{html.escape(e['stack_id'])}</h2>")
        parts.append("<table><tr><th>frame</th><th>hours</th><th>shown as</th></tr>")
        parts += [f"<tr><td>{f}</td><td>{h:g}</td><td>{html.escape(', '.join(r))}</td></tr>"
                  for f, h, r in e["frames"]]
        parts.append(f"</table><img src='{html.escape(e['png'])}' alt='{html.escape(e['stack_id'])}'>")
        if (out / "maps" / e["png"]).is_file():
            png, sid = html.escape(e["png"]), html.escape(e["stack_id"])
            parts.append(f"<h3>Tile map</h3><img src='maps/{png}' alt='map {sid}'>")
    path = out / "index.html"
    write_text(path, "\n".join(parts) + "\n")
    return path


def explain(
    checkpoint: str | Path,
    *,
    out: str | Path,
    manifest: str | Path | None = None,
    paths: Sequence[Path] = (),
    frames: Sequence[int] | None = None,
    device: str = "auto",
    batch_size: int = 32,
    frame_interval_hours: float | None = None,
    progress: bool = True,
) -> Path:
    """Montages `<out>/<stack_id>.png` and `<out>/index.html`; returns the index path. `frames`: these
    frame numbers of every stack instead of the default picks (see `pick_frames`)."""
    from cellmtl.engine import run_model
    from cellmtl.predict import new_stacks_dataset, write_stack_views
    from cellmtl.runtime import make_loader, pick_device

    ckpt, records, ds = new_stacks_dataset(checkpoint, manifest, paths, frame_interval_hours)
    cfg = ckpt.config
    index = ds.index
    if cfg.data.pre_onset != "keep":
        # Every frame is shown, but a pre-onset frame of an infected stack is not "wrong" for looking
        # uninfected when the model was trained without such frames (drop) or as uninfected.
        pre = (index.infected == 1) & (index.time_target < 0)
        index.infected[pre] = -1 if cfg.data.pre_onset == "drop" else 0
        index.time_target[pre] = np.nan if cfg.data.pre_onset == "drop" else index.hours[pre]
    if frames is not None:
        bad = [f for f in frames if f < 0 or not (index.frame == f).any()]
        if bad:
            raise BadInputError(f"explain --frames: frame {bad[0]} is in none of the stacks")
    dev = pick_device(device)
    model = ckpt.network().to(dev)
    preds = run_model(model, make_loader(ds, batch_size=batch_size, num_workers=0, device=dev), dev,
                      progress=progress, desc="explain", keep_maps=ds.tiles is not None)
    heads = [h for h, p in (("infected", preds.prob), ("time", preds.time_pred)) if p is not None]
    out = Path(out)
    write_stack_views(out, ds, preds, records, max_maps=len(records))  # plate view, onset, tile maps
    channel_names = list(ckpt.channel_names or [f"channel {c}" for c in ckpt.channels])
    channel_names = list(channel_names) * (model.spec.in_chans // max(len(channel_names), 1))
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    wanted = set(frames or ())
    for k, rec in enumerate(records):
        pos = np.flatnonzero(index.stack == k)
        if frames is not None:
            chosen = {int(p): ["chosen"] for p in pos if int(index.frame[p]) in wanted}
        else:
            t_err = None if preds.time_pred is None else np.abs(preds.time_pred[pos] - index.time_target[pos])
            picks = pick_frames(None if preds.prob is None else preds.prob[pos], index.infected[pos], t_err)
            chosen = {int(pos[p]): roles for p, roles in picks.items()}
        if not chosen:
            continue
        sel = list(chosen)
        images = [ds.load_image(i) for i in sel]
        cams: dict[str, list[np.ndarray]] = {h: [] for h in heads}
        for j, i in enumerate(sel):
            for head in heads:
                sign = None
                if head == "infected":  # explain the evidence for the class predicted for the frame
                    sign = torch.tensor([1.0 if preds.prob[i] >= 0.5 else -1.0])  # type: ignore[index]
                cams[head].append(frame_cam(model, images[j], head, sign, ds.tiles, dev))
        for head in heads:  # one scale per stack and head: the frames shown compare with each other
            peak = max(float(c.max()) for c in cams[head])
            cams[head] = [c / peak if peak > 0 else c for c in cams[head]]
        rows = []
        for j, i in enumerate(sel):
            rows.append({
                "image": images[j].numpy(),
                "cams": {h: cams[h][j] for h in heads},
                "caption": caption(rec.stack_id, int(index.frame[i]), float(index.hours[i]), chosen[i],
                                   None if preds.prob is None else float(preds.prob[i]),
                                   None if preds.time_pred is None else float(preds.time_pred[i]),
                                   int(index.infected[i]), float(index.time_target[i])),
            })
        stem = file_stem(rec.stack_id)
        png = plot_montage(rows, out / f"{stem}.png", heads, channel_names)
        entries.append({"stack_id": rec.stack_id, "anchor": stem, "png": png.name,
                        "frames": [(int(index.frame[i]), float(index.hours[i]), chosen[i]) for i in sel]})
    return write_index(out, entries)
