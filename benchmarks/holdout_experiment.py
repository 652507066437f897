"""A hold-out synthetic experiment, rendered independently of `cellmtl.synth`, to check a model on unseen-style data.

Deliberately different from the project's own generator: cells are irregular ellipses with a cytoplasm, placed at
random (not on a grid) and divide next to their parents; the reporter is cytoplasmic; nuclei condense rather than
swell; the camera is an sCMOS-like model (gaussian shot noise, column fixed-pattern, hot pixels) with a higher offset;
images are not square. It imports nothing from cellmtl, so a bug shared with the generator the tests use cannot hide
here.

Three infection courses. `synchronous` (default, high MOI; the experiment the acceptance figures were measured on):
80-95 % of the cells are infected at the onset; the reporter saturates within a few hours and an infected well then
changes little. `spread` (low MOI, added later as a check): 15-35 % are infected at the onset and the virus spreads
to their neighbours from 6 h after each cell's infection, so an infected well keeps changing for the whole stack
(more reporter-positive, rounded and detaching cells every hour), as plaques do. `cascade` (high MOI, added third)
gives every infected cell the stereotyped HSV-1 programme whose stages do not depend on the well's brightness: a
nuclear immediate-early reporter (an ICP4 fusion) lights up within the well's lag and saturates by ~6 h, then gathers
into a replication compartment that grows from 3 h and fills the nucleus by 12 h, pushing the stained chromatin to the
rim (a ring in the nuclear channel); the cells round up from 8 h; each well runs the programme at its own pace
(0.9-1.1x). It exists because in `synchronous` even hand-made features cannot tell the time since infection across
wells (docs/VALIDATION.md, "Quality on unseen data"), so that experiment cannot show whether the training
defaults learn a time that is in the images. Mock wells follow the same rules in every course, and `synchronous`
renders exactly what it did before the other courses existed.

    python benchmarks/holdout_experiment.py --out DIR [--seed S] [--stacks 12] [--frames 20] [--height 112]
        [--width 144] [--val 4] [--course synchronous|spread|cascade]

writes DIR/stacks/<stack_id>.tif (uint16 ImageJ hyperstacks, axes TCYX, ch0 nuclei, ch1 reporter) and DIR/manifest.csv
with the columns stack_id, path, condition, infection_onset_hour, frame_interval_hours, start_hour, group, split,
and prints the manifest path.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

FRAME_INTERVAL_H = 1.0
LATE_START_H = 4.0  # start_hour of about a third of the stacks
# --course spread (low MOI): a fraction of the cells is infected at the onset; a cell releases virus from
# ECLIPSE_H after its own infection (HSV-1's first progeny appear about 6 h after infection) until it
# detaches, and infects each uninfected cell within SPREAD_RADIUS of its body radii at SPREAD_RATE per hour.
COURSES = ("cascade", "spread", "synchronous")
ECLIPSE_H = 6.0
SPREAD_RADIUS = 3.0
SPREAD_RATE = 0.15
COLUMNS = (
    "stack_id",
    "path",
    "condition",
    "infection_onset_hour",
    "frame_interval_hours",
    "start_hour",
    "group",
    "split",
)


@dataclass
class Cell:
    """One cell; positions and radii in px, times in hours since experiment start."""

    y: float
    x: float
    body_r: float  # equivalent radius of the cell body
    elong: float  # major / minor axis of the body
    angle: float
    harmonics: np.ndarray  # [4, 2] amplitude and phase of outline modes 2..5 (irregular outline)
    nuc_frac: float  # nucleus radius / body radius
    nuc_shift: np.ndarray  # [2] nucleus offset from the body centre, fraction of body_r
    brightness: float
    texture: np.ndarray  # [3] phases of the chromatin texture
    born: float
    next_division: float
    infected_at: float = math.inf  # hour of infection of this cell (inf: never)
    dies_after: float = math.inf  # hours of infection after which it detaches
    expression: float = 1.0  # cell's reporter expression relative to the stack
    drift: np.ndarray = field(default_factory=lambda: np.zeros(2))


def _new_cell(rng: np.random.Generator, y: float, x: float, born: float, cycle_h: float) -> Cell:
    return Cell(
        y=y,
        x=x,
        body_r=float(rng.uniform(7.0, 10.0)),
        elong=float(rng.uniform(1.1, 1.9)),
        angle=float(rng.uniform(0, math.pi)),
        harmonics=np.column_stack([rng.uniform(0.02, 0.12, 4), rng.uniform(0, 2 * math.pi, 4)]),
        nuc_frac=float(rng.uniform(0.42, 0.55)),
        nuc_shift=rng.uniform(-0.15, 0.15, 2),
        brightness=float(rng.lognormal(0.0, 0.25)),
        texture=rng.uniform(0, 2 * math.pi, 3),
        born=born,
        next_division=born + float(rng.normal(cycle_h, 0.15 * cycle_h)),
        expression=float(rng.lognormal(0.0, 0.45)),
    )


def _place(rng: np.random.Generator, cells: list[Cell], h: int, w: int, tries: int = 40) -> tuple[float, float] | None:
    """Random position at least ~1.3 body radii from every other cell (None when the dish is full)."""
    for _ in range(tries):
        y, x = rng.uniform(-4, h + 4), rng.uniform(-4, w + 4)
        if all((c.y - y) ** 2 + (c.x - x) ** 2 > (1.3 * c.body_r) ** 2 for c in cells):
            return float(y), float(x)
    return None


def _binomial_blur(img: np.ndarray, passes: int) -> np.ndarray:
    """Defocus as repeated [1, 2, 1] / 4 smoothing along both image axes (edge pixels replicated)."""
    for _ in range(passes):
        for axis in (-2, -1):
            pad = [(0, 0)] * img.ndim
            pad[axis] = (1, 1)
            p = np.pad(img, pad, mode="edge")
            n = img.shape[axis]
            img = 0.25 * np.take(p, range(0, n), axis) + 0.5 * np.take(p, range(1, n + 1), axis)
            img = img + 0.25 * np.take(p, range(2, n + 2), axis)
    return img


def _draw(cell: Cell, now: float, frame: tuple[np.ndarray, np.ndarray], look: dict) -> None:
    """Composite one cell into the frame's two float images (max-projection, so touching cells occlude)."""
    img0, img1 = frame
    h, w = img0.shape
    tau = now - cell.infected_at  # h since this cell was infected (negative / -inf: not yet)
    k = max(tau, 0.0)
    fade = 1.0 if tau < cell.dies_after else max(0.0, 1.0 - (tau - cell.dies_after) / 2.0)  # detaching
    compartment = 0.0  # radius of the viral replication compartment / nucleus radius (course cascade)
    if look["course"] == "cascade":
        # The well's pace (0.9-1.1x), from the draw of rise_h, which this course does not otherwise use, so that
        # every other draw, mock wells included, is synchronous's. tau stays clock time for detaching.
        k *= 0.9 + 0.05 * (look["rise_h"] - 4.0)
        compartment = 0.75 * min(max((k - 3.0) / 9.0, 0.0), 1.0)  # grows from 3 h, fills the nucleus by 12 h
        condense = 0.0
        rounding = min(max((k - 8.0) / 8.0, 0.0), 1.0)  # cytopathic effect from about 8 h
        # Immediate-early reporter (an ICP4 fusion): nuclear, visible from the well's lag, saturating by ~6 h.
        reporter = 1.0 - math.exp(-(k - look["lag"]) / 2.0) if k > look["lag"] else 0.0
    else:
        rounding = 1.0 - math.exp(-k / 12.0) if tau > 0 else 0.0  # cells retract and round up
        condense = k / (k + 12.0)  # progressive chromatin condensation: half-way after 12 h of infection
        reporter = 0.0
        if tau > look["lag"]:
            reporter = 1.0 - math.exp(-(tau - look["lag"]) / look["rise_h"])
    age = now - cell.born
    spread = 0.85 + 0.15 * min(age / 4.0, 1.0)  # daughters flatten out over a few hours
    # Cells plated 2 h before imaging keep spreading on the dish: bodies and nuclei flatten out over ~10 h.
    spread *= 0.75 + 0.25 * (1.0 - math.exp(-(now + 2.0) / 10.0))

    body_r = cell.body_r * spread * (1.0 - 0.3 * rounding) * look["crowding"]
    elong = 1.0 + (cell.elong - 1.0) * (1.0 - rounding)
    ax, bx = body_r * math.sqrt(elong), body_r / math.sqrt(elong)
    nuc_r = cell.body_r * spread * cell.nuc_frac * (1.0 - 0.35 * condense) * (1.0 + 0.25 * compartment)
    half = int(ax * 1.25) + 3
    cy, cx = cell.y + cell.drift[0], cell.x + cell.drift[1]
    y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, h)
    x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, w)
    if y0 >= y1 or x0 >= x1:
        return
    dy = np.arange(y0, y1)[:, None] - cy
    dx = np.arange(x0, x1)[None, :] - cx
    ca, sa = math.cos(cell.angle), math.sin(cell.angle)
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    theta = np.arctan2(v / bx, u / ax)
    rho = np.hypot(u / ax, v / bx)
    amp = cell.harmonics[:, 0] * (1.0 - 0.8 * rounding)
    outline = 1.0 + sum(amp[i] * np.cos((i + 2) * theta + cell.harmonics[i, 1]) for i in range(4))
    body = np.clip((outline - rho) * body_r / 1.5 + 0.5, 0.0, 1.0)  # linear 1.5 px edge ramp

    ny, nx = cy + cell.nuc_shift[0] * body_r, cx + cell.nuc_shift[1] * body_r
    nd = np.hypot(np.arange(y0, y1)[:, None] - ny, (np.arange(x0, x1)[None, :] - nx) * 0.9)
    nucleus = np.clip((nuc_r - nd) / 1.2 + 0.5, 0.0, 1.0)
    whole_nucleus = nucleus
    rc = 0.0  # the replication compartment's mask
    if compartment > 0.0:
        # The compartment pushes the host chromatin to the nuclear rim: the stained nucleus becomes a ring.
        rc = np.clip((compartment * nuc_r - nd) / 1.2 + 0.5, 0.0, 1.0)
        nucleus = nucleus * (1.0 - 0.85 * rc)
    t1, t2, t3 = cell.texture
    chromatin = (
        1.0
        + (0.12 + 0.25 * condense) * np.sin(0.9 * dy + t1) * np.cos(0.8 * dx + t2)
        + 0.08 * np.sin(0.5 * (dx + dy) + t3)
    )
    nuc_level = look["nuc_level"] * cell.brightness * (1.0 + 1.2 * condense) * fade
    cyto_level = look["rep_level"] * cell.expression * reporter * fade
    ch0 = nucleus * chromatin * nuc_level
    if look["course"] == "cascade":
        # Nuclear reporter: diffuse in the nucleus, then gathering in the growing compartment.
        gather = compartment / 0.75
        reporter_px = whole_nucleus * (1.0 - gather) + rc * 1.6 * gather
    else:
        # Cytoplasmic reporter: the body minus the nucleus, brighter towards the nucleus. It gathers around the
        # nucleus as infection proceeds (perinuclear assembly sites).
        reporter_px = np.clip(body - nucleus, 0.0, 1.0) * (1.2 - (0.3 + 0.6 * condense) * np.clip(rho, 0.0, 1.0))
    ch1 = reporter_px * cyto_level + body * look["autofluor"] * fade  # plus faint autofluorescence
    np.maximum(img0[y0:y1, x0:x1], ch0, out=img0[y0:y1, x0:x1])
    np.maximum(img1[y0:y1, x0:x1], ch1, out=img1[y0:y1, x0:x1])


def _spread(rng: np.random.Generator, cells: list[Cell], now: float, step_h: float) -> None:
    """Infect uninfected cells near productive ones (course `spread`): a plaque grows from each infected cell."""
    productive = [c for c in cells if ECLIPSE_H <= now - c.infected_at < c.dies_after]
    if not productive:
        return
    for c in cells:
        if c.infected_at < math.inf:
            continue
        n = sum((p.y - c.y) ** 2 + (p.x - c.x) ** 2 < (SPREAD_RADIUS * p.body_r) ** 2 for p in productive)
        if n and rng.uniform() < 1.0 - math.exp(-SPREAD_RATE * n * step_h):
            c.infected_at = now
            c.dies_after = float(rng.uniform(13.0, 30.0))


def render(rng: np.random.Generator, *, frames: int, height: int, width: int, start: float, onset: float | None,
           course: str = "synchronous"):
    """One stack as uint16 [frames, 2, height, width]; `onset` in hours since start (None: mock).

    `course`: `synchronous` infects 80-95 % of the cells at the onset (high MOI), so after a few hours an
    infected well hardly changes; `spread` infects 15-35 % at the onset and the rest from their neighbours
    (low MOI), so the share of infected, rounding and detaching cells keeps growing for the whole stack;
    `cascade` infects as `synchronous` but each cell then runs the replication-compartment programme (see the
    module docstring), whose stages are a clock that the well's brightness and focus do not change."""
    cycle_h = float(rng.uniform(18.0, 22.0))
    look = {
        "nuc_level": float(rng.uniform(2500.0, 7000.0)),
        "rep_level": float(rng.uniform(2500.0, 7000.0)),  # reporter brightness varies between stacks
        "autofluor": float(rng.uniform(60.0, 160.0)),
        "lag": float(rng.uniform(0.5, 1.5)),
        "rise_h": float(rng.uniform(4.0, 8.0)),  # h; the reporter keeps rising for most of the stack
        "crowding": 1.0,
        "course": course,
    }
    offset = rng.uniform(380.0, 620.0, 2)
    adu_per_e = rng.uniform(0.3, 0.9)
    read_e = rng.uniform(1.0, 2.5)
    passes = int(rng.integers(1, 6))
    bleach = rng.uniform([0.01, 0.015], [0.035, 0.04])  # per frame
    bg_rise = rng.uniform(2.0, 8.0)  # medium autofluorescence grows, ADU per hour
    gradient = rng.uniform(-0.25, 0.25, 2)
    columns = rng.normal(0.0, 4.0, (2, 1, width))  # sCMOS column fixed pattern, ADU
    hot = rng.uniform(size=(height, width)) < 3e-4
    infect_p = float(rng.uniform(0.8, 0.95))
    if course == "spread":
        infect_p = 0.15 + (infect_p - 0.8) * 4.0 / 3.0  # same draw, mapped to 0.15-0.35

    n0 = int(rng.integers(17, 21) * height * width / (112 * 144))
    cells: list[Cell] = []
    for _ in range(max(n0, 2)):
        pos = _place(rng, cells, height, width)
        if pos is not None:
            cells.append(_new_cell(rng, *pos, born=-rng.uniform(0, cycle_h), cycle_h=cycle_h))
    if onset is not None:
        for c in cells:
            if rng.uniform() < infect_p:
                c.infected_at = onset + float(rng.exponential(0.6))
                c.dies_after = float(rng.uniform(13.0, 30.0))

    out = np.zeros((frames, 2, height, width))
    yy, xx = np.mgrid[0:height, 0:width]
    shade = 1.0 + gradient[0] * (yy / height - 0.5) + gradient[1] * (xx / width - 0.5)
    now = 0.0
    times = start + FRAME_INTERVAL_H * np.arange(frames)
    for f, t_frame in enumerate(times):
        # Advance the culture in 0.5 h steps up to this frame: divisions, random motility.
        while now < t_frame:
            step_h = min(0.5, t_frame - now)
            now += step_h
            for c in list(cells):
                c.drift = np.clip(c.drift + rng.normal(0.0, 0.35, 2), -5.0, 5.0)
                if c.next_division <= now and c.infected_at > now:
                    c.next_division = now + float(rng.normal(cycle_h, 0.15 * cycle_h))
                    ang = rng.uniform(0, 2 * math.pi)
                    y, x = c.y + 1.6 * c.body_r * math.sin(ang), c.x + 1.6 * c.body_r * math.cos(ang)
                    if all((o.y - y) ** 2 + (o.x - x) ** 2 > (1.1 * o.body_r) ** 2 for o in cells if o is not c):
                        d = _new_cell(rng, y, x, born=now, cycle_h=cycle_h)
                        if onset is not None and now > onset and rng.uniform() < 0.5 * infect_p:
                            d.infected_at = now + float(rng.exponential(2.0))  # secondary spread
                            d.dies_after = float(rng.uniform(13.0, 30.0))
                        cells.append(d)
            if course == "spread" and onset is not None and now > onset:
                _spread(rng, cells, now, step_h)
        area = sum(math.pi * c.body_r**2 for c in cells) / (height * width)
        look["crowding"] = 1.0 / (1.0 + 0.25 * max(area - 0.5, 0.0))  # contact inhibition of spreading
        img0, img1 = np.zeros((height, width)), np.zeros((height, width))
        for c in sorted(cells, key=lambda c: c.born):
            if c.infected_at + c.dies_after + 2.0 > t_frame:
                _draw(c, float(t_frame), (img0, img1), look)
        out[f, 0], out[f, 1] = img0, img1
        out[f] *= np.exp(-bleach * f)[:, None, None]
        out[f] += bg_rise * (t_frame - start) * np.array([0.3, 1.0])[:, None, None]  # medium autofluorescence

    out = _binomial_blur(out, passes) * shade
    electrons = np.clip(out, 0.0, None) / adu_per_e
    electrons = electrons + rng.normal(0.0, 1.0, out.shape) * np.sqrt(electrons + read_e**2)
    adu = electrons * adu_per_e + offset[None, :, None, None] + columns[None]
    adu[:, :, hot] = 4000.0
    return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)


def write(out: Path, *, seed: int, stacks: int, frames: int, height: int, width: int, val: int,
          course: str = "synchronous") -> Path:
    """Render the experiment into `out` and return the manifest path; ValueError for impossible arguments."""
    if stacks < 4 or stacks % 2:
        raise ValueError(f"--stacks must be an even number >= 4, got {stacks}")
    if val % 2 or not 2 <= val <= stacks - 2:
        raise ValueError(f"--val must be even and between 2 and {stacks - 2}, got {val}")
    if frames < 1 or height < 32 or width < 32:
        raise ValueError("--frames must be >= 1 and --height/--width >= 32")
    plan = np.random.default_rng([seed, 7919])
    n_pairs = stacks // 2
    late_pairs = [k for k in range(n_pairs) if k % 3 == 2]  # about a third of the dishes start at hour 4
    early_pairs = [k for k in range(n_pairs) if k % 3 != 2]
    plan.shuffle(late_pairs)
    plan.shuffle(early_pairs)
    order = [k for pair in zip(early_pairs, late_pairs + [None] * n_pairs, strict=False) for k in pair if k is not None]
    val_pairs = set(order[: val // 2])  # one pair in validation starting late whenever possible

    (out / "stacks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(stacks):
        pair, infected = i // 2, i % 2 == 1
        rng = np.random.default_rng([seed, 104729, i])
        onset = round(float(rng.uniform(1.0, 3.0)), 2) if infected else None
        start = LATE_START_H if pair in late_pairs else 0.0
        stack_id = f"ho{i:02d}"
        arr = render(rng, frames=frames, height=height, width=width, start=start, onset=onset, course=course)
        rel = f"stacks/{stack_id}.tif"
        meta = {"axes": "TCYX", "finterval": FRAME_INTERVAL_H * 3600.0, "unit": "um"}
        tifffile.imwrite(out / rel, arr, imagej=True, metadata=meta)
        rows.append(
            {
                "stack_id": stack_id,
                "path": rel,
                "condition": "infected" if infected else "uninfected",
                "infection_onset_hour": "" if onset is None else f"{onset:g}",
                "frame_interval_hours": f"{FRAME_INTERVAL_H:g}",
                "start_hour": f"{start:g}",
                "group": f"dish{pair}",
                "split": "val" if pair in val_pairs else "train",
            }
        )
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder (created)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stacks", type=int, default=12, help="even; half infected")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--height", type=int, default=112, help="Y, px")
    ap.add_argument("--width", type=int, default=144, help="X, px")
    ap.add_argument("--val", type=int, default=4, help="stacks marked split=val (even; half infected)")
    ap.add_argument("--course", choices=COURSES, default="synchronous",
                    help="infection course: synchronous (high MOI, default; the acceptance's first experiment), spread "
                    "(low MOI) or cascade (high MOI, a replication-compartment clock in every infected cell)")
    a = ap.parse_args(argv)
    try:
        manifest = write(
            a.out, seed=a.seed, stacks=a.stacks, frames=a.frames, height=a.height, width=a.width, val=a.val,
            course=a.course,
        )
    except ValueError as e:
        ap.error(str(e))  # exits 2
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
