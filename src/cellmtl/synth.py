"""Synthetic infection time-lapse experiments, so the pipeline can be trained and tested without real data.

The model of biology (details in docs/SYNTHETIC_DATA.md):

* infected cells change with time since infection ``tau`` (hours): nuclei grow, replication compartments make the
  nuclear stain grainy, a reporter (ch1) rises sigmoidally after a lag of 1-2 h, and after ~12 h cells round up and
  brighten;
* all cells change with time since experiment start: division raises cell density (contact inhibition makes
  nuclei smaller, longer and aligned) and photobleaching dims both channels with every frame taken; infected cells
  stop dividing and, late, detach;
* stacks differ in gain, focus, background, illumination, noise and reporter strength, so no single intensity gives
  the answer.

Everything is vectorised numpy; every random draw comes from ``np.random.default_rng([seed, stack_index])``, so an
experiment is a pure function of its arguments.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from cellmtl.errors import BadInputError

__all__ = ["MANIFEST_COLUMNS", "write_experiment", "render_stack"]

MANIFEST_COLUMNS = (
    "stack_id",
    "path",
    "condition",
    "infection_onset_hour",
    "frame_interval_hours",
    "start_hour",
    "group",
)

# Geometry in pixels; independent of `size`, which sets the field of view (a bigger image shows more cells).
_SITE_SPACING = 16.0  # mean distance between neighbouring cells once the well is confluent
_HALF_PATCH = 13  # cells are rendered into (2 * 13 + 1)^2 px patches; large enough for all but extreme nuclei
_N_PUNCTA = 5  # replication compartments / nucleoli per nucleus
_START_HOURS = (0.0, 2.0, 4.0)  # start_hour of pair k is _START_HOURS[k % 3]


@dataclass(frozen=True)
class _Stack:
    """What the manifest says about one stack (the rest of its parameters stay inside its generator)."""

    stack_id: str
    condition: str
    onset: float | None  # hours since experiment start; None for mock
    start_hour: float
    group: str


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _check_args(n_stacks: int, n_frames: int, size: int, frame_interval_hours: float) -> None:
    for name, value, low in (("n_stacks", n_stacks, 2), ("n_frames", n_frames, 1), ("size", size, 16)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise BadInputError(f"synth: {name} must be an integer, got {value!r}")
        if value < low:
            raise BadInputError(f"synth: {name} must be >= {low}, got {value}")
    interval = float(frame_interval_hours)
    if not math.isfinite(interval) or interval <= 0:
        raise BadInputError(f"synth: frame_interval_hours must be a positive number, got {frame_interval_hours!r}")


def _gauss_blur(img: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Separable gaussian blur of [T, C, Y, X] with one sigma (px) per frame; reflecting borders.

    Shift-and-add rather than matrix products: no BLAS threads, which thrash on small busy machines.
    """
    radius = min(int(math.ceil(3.0 * float(sigmas.max()))), min(img.shape[-2:]) - 1)
    offsets = np.arange(-radius, radius + 1)
    kernels = np.exp(-0.5 * (offsets[None, :] / sigmas[:, None]) ** 2)
    kernels /= kernels.sum(axis=1, keepdims=True)  # [T, 2r+1]
    for axis in (-2, -1):
        n = img.shape[axis]
        pad = [(0, 0)] * img.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(img, pad, mode="symmetric")
        out = np.zeros_like(img)
        for j in range(2 * radius + 1):
            window = padded[..., j : j + n, :] if axis == -2 else padded[..., j : j + n]
            out += kernels[:, j, None, None, None] * window
        img = out
    return img


def render_stack(
    rng: np.random.Generator,
    *,
    n_frames: int,
    size: int,
    start_hour: float,
    frame_interval_hours: float,
    onset: float | None,
) -> np.ndarray:
    """Render one stack as uint16 [T, 2, size, size] (ch0 nuclear stain, ch1 infection reporter), in camera counts.

    `onset` is the infection onset in hours since experiment start (None: mock well). Frame i is taken at
    ``start_hour + i * frame_interval_hours`` hours since start.
    """
    T, S, dt = n_frames, size, float(frame_interval_hours)
    hours = start_hour + dt * np.arange(T)  # [T] hours since experiment start
    infected_well = onset is not None

    # --- per-stack nuisance and kinetics ------------------------------------------------------------------
    gain = math.exp(rng.uniform(math.log(0.75), math.log(1.35)))
    chan_gain = np.exp(rng.normal(0.0, 0.1, size=2))
    offset = rng.uniform(95.0, 135.0, size=2)  # camera offset + medium autofluorescence, counts
    focus = rng.uniform(0.5, 1.8)  # gaussian blur sigma, px
    focus_drift = rng.normal(0.0, 0.15, size=T)
    vignette = rng.uniform(0.0, 0.3)
    light_centre = rng.uniform(0.3, 0.7, size=2) * S
    photons_per_count = rng.uniform(0.4, 2.0)
    read_noise = rng.uniform(3.0, 12.0)  # counts
    bleach = np.array([rng.uniform(0.008, 0.03), rng.uniform(0.006, 0.025)])  # per frame, ch0 / ch1
    seed_fraction = rng.uniform(0.30, 0.35)  # occupied sites at hour 0
    doubling_h = rng.uniform(16.0, 19.0)
    flow = rng.uniform(0.0, math.pi)  # direction dense cells align to
    reporter_strength = math.exp(rng.uniform(math.log(0.6), math.log(1.5)))
    reporter_lag = rng.uniform(1.0, 2.0)  # h from infection to half-maximal reporter
    reporter_hill = rng.uniform(2.5, 4.5)  # steepness of the reporter rise
    infected_fraction = rng.uniform(0.75, 0.95)

    # --- cell sites on a jittered grid that overhangs the image (cells are cut at the border) ---------------
    n_side = int(math.ceil(S / _SITE_SPACING)) + 1
    gy, gx = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    M = n_side * n_side
    base_y = (gy.ravel() - 0.5 + 0.5 * rng.uniform(0.0, 1.0)) * _SITE_SPACING
    base_x = (gx.ravel() - 0.5 + 0.5 * rng.uniform(0.0, 1.0)) * _SITE_SPACING
    base_y = base_y + rng.uniform(-0.3, 0.3, M) * _SITE_SPACING
    base_x = base_x + rng.uniform(-0.3, 0.3, M) * _SITE_SPACING
    # Slow random walk (0.5 px per sqrt(h)), clipped so neighbours do not swap places.
    steps = rng.normal(0.0, 0.5 * math.sqrt(dt), size=(T, M, 2))
    walk = np.clip(np.cumsum(steps, axis=0), -4.0, 4.0)
    cy = base_y[None, :] + walk[..., 0]  # [T, M]
    cx = base_x[None, :] + walk[..., 1]

    # --- per-cell traits [M] ------------------------------------------------------------------------------
    # Order in which sites fill up; stratified, so the occupied fraction follows the growth curve closely.
    u = 0.97 * (rng.permutation(M) + rng.uniform(0.0, 1.0, M)) / M
    radius0 = np.clip(rng.normal(4.8, 0.5, M), 3.6, 6.2)  # px, nucleus equivalent radius
    aspect0 = rng.uniform(1.0, 1.55, M)
    angle = rng.uniform(0.0, math.pi, M)
    bright = np.exp(rng.normal(0.0, 0.2, M))
    infected = (rng.uniform(size=M) < infected_fraction) & infected_well  # drawn for mock too: same cells
    delay = rng.gamma(2.0, 0.4, M)  # h, cell-to-cell spread of infection within a well
    lysis = 12.0 + rng.gamma(2.0, 6.0, M)  # h of infection after which the cell detaches (gone from view)
    response = np.exp(rng.normal(0.0, 0.3, M))  # cell reporter expression relative to the well
    p_r = 0.62 * np.sqrt(rng.uniform(size=(M, _N_PUNCTA)))  # puncta positions, fraction of the nucleus
    p_a = rng.uniform(0.0, 2 * math.pi, size=(M, _N_PUNCTA))
    p_threshold = rng.uniform(1.5, 16.0, size=(M, _N_PUNCTA))  # h of infection at which each compartment forms

    # --- who is there: growth, arrest and lysis of infected cells [T, M] -------------------------------
    # Exponential growth until the sites run out: site m is occupied once seed_fraction * 2^(t / doubling_h) > u_m.
    birth = doubling_h * np.log2(np.maximum(u, 1e-6) / seed_fraction)  # [M] h since start; < 0: seeded
    if infected_well:
        tau_c = hours[:, None] - onset - delay[None, :]  # h since this cell got infected
        tau_c = np.where(infected[None, :], tau_c, -np.inf)
        # Infection arrests the cell cycle: infected cells due after onset are never born.
        birth = np.where(infected & (birth > onset + 0.5), np.inf, birth)
    else:
        tau_c = np.full((T, M), -np.inf)
    present = (hours[:, None] >= birth[None, :]) & (tau_c < lysis[None, :])
    confluence = present.mean(axis=1)  # [T]

    # --- state of every cell in every frame [T, M] ------------------------------------------------------
    age = hours[:, None] - birth[None, :]  # h since the cell appeared; newborn daughters are small and bright
    newborn = np.exp(-np.clip(age, 0.0, None) / 1.0) * (birth[None, :] > 0)
    tau_pos = np.clip(tau_c, 0.0, None)
    growth = 1.0 - np.exp(-tau_pos / 12.0)  # nuclear swelling, continues through the whole stack
    late = np.where(np.isfinite(tau_c), _sigmoid((tau_c - 13.0) / 2.0), 0.0)  # rounding / condensation
    # Hill-type rise: ~0 at infection, half-maximal after `reporter_lag` hours.
    reporter = tau_pos**reporter_hill / (tau_pos**reporter_hill + reporter_lag**reporter_hill)

    # Contact inhibition: as the monolayer fills, nuclei get smaller, more elongated and align with each other.
    packing = np.clip((confluence[:, None] - 0.3) / 0.5, 0.0, 1.0)  # [T, 1], 0 sparse .. 1 confluent
    turn = (flow - angle[None, :] + 0.5 * math.pi) % math.pi - 0.5 * math.pi
    orient = angle[None, :] + 0.8 * packing * turn  # [T, M]
    crowding = 1.08 - 0.25 * packing
    radius = radius0[None, :] * crowding * (1.0 + 0.5 * growth) * (1.0 - 0.12 * late) * (1.0 - 0.2 * newborn)
    aspect = 1.0 + (aspect0[None, :] - 1.0 + 0.5 * packing) * (1.0 - late)
    edge = 0.9 - 0.45 * late  # px, soft edge of the nucleus; rounded cells have crisp outlines
    amp0 = 1100.0 * bright[None, :] * (1.0 + 0.9 * late) * (1.0 + 0.5 * newborn)
    amp1_diffuse = 25.0 * bright[None, :] + 1600.0 * reporter_strength * response[None, :] * reporter * (1 + 0.3 * late)
    amp1_puncta = 1600.0 * reporter_strength * response[None, :] * reporter
    # Compartments form one by one as infection proceeds; mock nuclei keep faint nucleoli (0.2).
    punct = np.maximum(0.2, _sigmoid((tau_c[..., None] - p_threshold[None]) / 1.0))  # [T, M, K]

    # --- render the present cells into patches and scatter them into the stack -------------------------------
    t_idx, m_idx = np.nonzero(present)
    Q = len(t_idx)
    bleach_t = np.exp(-bleach[None, :] * np.arange(T)[:, None])  # [T, 2]
    image = np.zeros((2, T * S * S))
    if Q:
        qcy, qcx = cy[t_idx, m_idx], cx[t_idx, m_idx]
        iy, ix = np.floor(qcy).astype(int), np.floor(qcx).astype(int)
        offs = np.arange(-_HALF_PATCH, _HALF_PATCH + 1)
        dy = (iy[:, None] + offs[None, :]) - qcy[:, None]  # [Q, P], px from the centre
        dx = (ix[:, None] + offs[None, :]) - qcx[:, None]
        r, a, th = radius[t_idx, m_idx], aspect[t_idx, m_idx], orient[t_idx, m_idx]
        semi_u, semi_v = r * np.sqrt(a), r / np.sqrt(a)
        cos, sin = np.cos(th)[:, None, None], np.sin(th)[:, None, None]
        uu = dx[:, None, :] * cos + dy[:, :, None] * sin  # [Q, P(y), P(x)]
        vv = -dx[:, None, :] * sin + dy[:, :, None] * cos
        dist = np.sqrt((uu / semi_u[:, None, None]) ** 2 + (vv / semi_v[:, None, None]) ** 2)
        mask = _sigmoid((1.0 - dist) * r[:, None, None] / edge[t_idx, m_idx][:, None, None])
        dome = np.clip(1.0 - 0.25 * dist**2, 0.0, None) * mask

        # Puncta: isotropic gaussians (sigma 1.1 px) inside the nucleus; separable, so one batched matmul.
        pu = p_r[m_idx] * np.cos(p_a[m_idx]) * semi_u[:, None]
        pv = p_r[m_idx] * np.sin(p_a[m_idx]) * semi_v[:, None]
        py = pu * np.sin(th)[:, None] + pv * np.cos(th)[:, None]  # [Q, K] px from the centre
        px = pu * np.cos(th)[:, None] - pv * np.sin(th)[:, None]
        gy_ = np.exp(-0.5 * ((dy[:, None, :] - py[..., None]) / 1.1) ** 2)  # [Q, K, P]
        gx_ = np.exp(-0.5 * ((dx[:, None, :] - px[..., None]) / 1.1) ** 2)
        strength = punct[t_idx, m_idx]  # [Q, K]
        spots = np.matmul(np.swapaxes(gy_ * strength[..., None], 1, 2), gx_) * mask  # [Q, P, P]

        ch0 = amp0[t_idx, m_idx][:, None, None] * dome * (1.0 - 0.6 * np.clip(spots, 0.0, 1.0))
        # Nucleoli of uninfected cells carry no reporter: amp1_puncta is 0 wherever the reporter is 0.
        ch1 = amp1_diffuse[t_idx, m_idx][:, None, None] * dome + amp1_puncta[t_idx, m_idx][:, None, None] * spots

        yy = iy[:, None] + offs[None, :]
        xx = ix[:, None] + offs[None, :]
        inside = ((yy >= 0) & (yy < S))[:, :, None] & ((xx >= 0) & (xx < S))[:, None, :]
        flat = (t_idx[:, None, None] * S + yy[:, :, None]) * S + xx[:, None, :]
        for c, vals in enumerate((ch0, ch1)):
            image[c] = np.bincount(flat[inside], weights=vals[inside], minlength=T * S * S)
    signal = image.reshape(2, T, S, S).transpose(1, 0, 2, 3)  # [T, 2, S, S]

    # --- optics and camera --------------------------------------------------------------------------------------
    signal = _gauss_blur(signal, np.clip(focus + focus_drift, 0.3, None))
    yy, xx = np.mgrid[0:S, 0:S]
    rr2 = ((yy - light_centre[0]) ** 2 + (xx - light_centre[1]) ** 2) / (0.5 * S) ** 2
    illumination = 1.0 - vignette * np.clip(rr2, 0.0, 2.0) / 2.0  # [S, S]
    signal = signal * (gain * chan_gain * bleach_t)[:, :, None, None] * illumination
    counts = rng.poisson(np.clip(signal, 0.0, None) * photons_per_count) / photons_per_count
    counts = counts + offset[None, :, None, None] + rng.normal(0.0, read_noise, size=counts.shape)
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)


def _plan(n_stacks: int, seed: int) -> list[tuple[_Stack, np.random.Generator]]:
    """Conditions, onsets, start hours and groups; each stack keeps its own generator for rendering."""
    plan = []
    n_groups = n_stacks // 2  # an odd last stack joins the last pair, so every group holds both conditions
    for i in range(n_stacks):
        rng = np.random.default_rng([seed, i])
        infected = i % 2 == 0
        onset = round(float(rng.uniform(1.0, 4.0)) * 2.0) / 2.0 if infected else None
        pair = min(i // 2, n_groups - 1)
        stack = _Stack(
            stack_id=f"stack{i:02d}",
            condition="infected" if infected else "uninfected",
            onset=onset,
            start_hour=_START_HOURS[pair % len(_START_HOURS)],
            group=f"plate{pair}",
        )
        plan.append((stack, rng))
    return plan


def _fmt(x: float) -> str:
    return f"{x:g}"


def write_experiment(
    out: str | Path,
    *,
    n_stacks: int = 12,
    n_frames: int = 24,
    size: int = 128,
    seed: int = 0,
    frame_interval_hours: float = 1.0,
) -> Path:
    """Write TIFF stacks + manifest.csv into out; return the manifest path.

    Stacks are ImageJ hyperstacks ``out/stacks/<stack_id>.tif`` (uint16, axes TCYX, shape [n_frames, 2, size,
    size]); even-indexed stacks are infected, odd ones mock, and consecutive pairs share a ``group`` (plate).
    """
    _check_args(n_stacks, n_frames, size, frame_interval_hours)
    out = Path(out)
    stack_dir = out / "stacks"
    stack_dir.mkdir(parents=True, exist_ok=True)
    dt = float(frame_interval_hours)
    rows = []
    for stack, rng in _plan(int(n_stacks), int(seed)):
        arr = render_stack(
            rng,
            n_frames=int(n_frames),
            size=int(size),
            start_hour=stack.start_hour,
            frame_interval_hours=dt,
            onset=stack.onset,
        )
        rel = f"stacks/{stack.stack_id}.tif"
        tifffile.imwrite(out / rel, arr, imagej=True, metadata={"axes": "TCYX", "finterval": dt * 3600.0, "unit": "um"})
        rows.append(
            {
                "stack_id": stack.stack_id,
                "path": rel,
                "condition": stack.condition,
                "infection_onset_hour": "" if stack.onset is None else _fmt(stack.onset),
                "frame_interval_hours": _fmt(dt),
                "start_hour": _fmt(stack.start_hour),
                "group": stack.group,
            }
        )
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest
