"""What a file's own metadata says: frame times, channel names, display colours.

Pure functions of the metadata tifffile hands over (the OME-XML string, the ImageJ metadata dict), so
each rule is tested with hand-written metadata. Readers in `cellmtl.data.readers` call them while probing.

Times: the manifest's `frame_interval_hours` wins over these, and these win over `data.frame_interval_hours`
(SPEC section 1); the precedence itself lives in `cellmtl.data.dataset.with_file_times`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

import numpy as np

# Hours per unit, for the spellings ImageJ (`tunit`), OME (`TimeIncrementUnit`, `DeltaTUnit`) and people use.
_HOURS_PER_UNIT = {
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 1.0),
    **dict.fromkeys(("min", "mins", "minute", "minutes"), 1.0 / 60),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0 / 3600),
    **dict.fromkeys(("ms", "msec", "millisecond", "milliseconds"), 1.0 / 3.6e6),
    **dict.fromkeys(("µs", "μs", "us", "microsecond", "microseconds"), 1.0 / 3.6e9),
    **dict.fromkeys(("d", "day", "days"), 24.0),
}
# Steps that differ by less than this fraction count as one regular interval (timestamps jitter by a few ms).
REGULAR_TOLERANCE = 0.01
# Named colours of ImageJ's standard LUTs, by the colour of their brightest entry.
_LUT_NAMES = {
    (255, 0, 0): "red", (0, 255, 0): "green", (0, 0, 255): "blue", (0, 255, 255): "cyan",
    (255, 0, 255): "magenta", (255, 255, 0): "yellow", (255, 255, 255): "grays",
}


@dataclass(frozen=True)
class FileTimes:
    """Frame times a file records. `interval_hours`: the step between frames (hours); `frame_hours`: each
    frame's hours since the first frame where the steps are irregular (OME `DeltaT`), else None."""

    interval_hours: float
    frame_hours: tuple[float, ...] | None = None
    source: str = ""  # e.g. "ImageJ finterval", "OME TimeIncrement", "OME DeltaT"


def hours_per_unit(unit: str | None, default: str = "s") -> float | None:
    """Hours in one `unit` (None: `default`); None for a unit we do not know (metres, pixels, ...)."""
    word = (unit or default).strip()
    return _HOURS_PER_UNIT.get(word, _HOURS_PER_UNIT.get(word.lower()))


def _positive(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) and out > 0 else None


def imagej_times(ij: Mapping[str, Any] | None) -> FileTimes | None:
    """ImageJ's `finterval` in its `tunit` (ImageJ writes no `tunit` for seconds, its default)."""
    if not ij:
        return None
    step = _positive(ij.get("finterval"))
    scale = hours_per_unit(ij.get("tunit"), default="sec")
    if step is None or scale is None:
        return None
    return FileTimes(step * scale, None, "ImageJ finterval")


def _ome_pixels(xml: str | None) -> ElementTree.Element | None:
    """The first image's Pixels element (the image that tifffile's series 0 reads)."""
    if not xml:
        return None
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    return next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)


def _children(pixels: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [el for el in pixels if el.tag.rsplit("}", 1)[-1] == name]


def regular_or_irregular(frame_hours: Sequence[float], source: str) -> FileTimes | None:
    """Frame times (hours, ascending) -> one interval when the steps agree within REGULAR_TOLERANCE, else
    the times themselves (interval: their median step). None when the times do not increase."""
    hours = np.asarray(frame_hours, dtype=np.float64)
    steps = np.diff(hours)
    if len(steps) == 0 or not np.all(np.isfinite(steps)) or np.any(steps <= 0):
        return None
    if steps.max() - steps.min() <= REGULAR_TOLERANCE * steps.mean():
        return FileTimes(float(steps.mean()), None, source)
    rel = hours - hours[0]
    return FileTimes(float(np.median(steps)), tuple(float(h) for h in rel), source)


def _delta_t(pixels: ElementTree.Element, n_frames: int) -> FileTimes | None:
    """Per-frame times from the Plane elements' DeltaT (the earliest plane of each T)."""
    first: dict[int, float] = {}
    for plane in _children(pixels, "Plane"):
        t, dt = plane.get("TheT"), plane.get("DeltaT")
        scale = hours_per_unit(plane.get("DeltaTUnit"))
        if t is None or dt is None or scale is None:
            continue
        try:
            t_i, hours = int(t), float(dt) * scale
        except ValueError:
            continue
        first[t_i] = min(hours, first.get(t_i, hours))
    if sorted(first) != list(range(n_frames)):
        return None
    return regular_or_irregular([first[t] for t in range(n_frames)], "OME DeltaT")


def ome_times(xml: str | None, n_frames: int) -> FileTimes | None:
    """OME `DeltaT` per plane where it gives every frame a time, else `TimeIncrement` with its unit."""
    pixels = _ome_pixels(xml)
    if pixels is None or n_frames < 2:
        return None
    per_plane = _delta_t(pixels, n_frames)
    if per_plane is not None:
        return per_plane
    step = _positive(pixels.get("TimeIncrement"))
    scale = hours_per_unit(pixels.get("TimeIncrementUnit"))
    if step is None or scale is None:
        return None
    return FileTimes(step * scale, None, "OME TimeIncrement")


def distinct_names(names: Sequence[str], n_channels: int) -> tuple[str, ...] | None:
    """Names usable to match channels: one distinct, non-empty name per channel, else None."""
    out = tuple((n or "").strip() for n in names)
    if len(out) != n_channels or not all(out) or len(set(out)) != len(out):
        return None
    return out


def ome_channel_names(xml: str | None, n_channels: int) -> tuple[str, ...] | None:
    """The first image's channel names from OME-XML; None unless there is one distinct, non-empty name per
    channel (an RGB channel of 3 samples, missing or repeated names: no names)."""
    pixels = _ome_pixels(xml)
    if pixels is None:
        return None
    return distinct_names([ch.get("Name") or "" for ch in _children(pixels, "Channel")], n_channels)


def imagej_channel_names(ij: Mapping[str, Any] | None, n_channels: int) -> tuple[str, ...] | None:
    """Channel names from ImageJ slice labels. ImageJ orders planes C fastest, so the first `n_channels`
    labels name the channels, and a hyperstack's labels must repeat them for every Z and T (labels that
    name each plane, such as 'c:1/2 t:3/10', name no channel)."""
    labels = list((ij or {}).get("Labels") or [])
    if n_channels < 1 or not labels or len(labels) % n_channels:
        return None
    names = [str(label) for label in labels]
    if any(names[k] != names[k % n_channels] for k in range(len(names))):
        return None
    return distinct_names(names[:n_channels], n_channels)


def lut_name(lut: Any) -> str:
    """An ImageJ LUT `[3, 256]` as the colour name of its brightest entry ('magenta'), or '#rrggbb'."""
    arr = np.asarray(lut)
    if arr.ndim != 2 or arr.shape[0] != 3 or arr.shape[1] == 0:
        return "?"
    rgb = tuple(int(v) for v in arr[:, -1])
    return _LUT_NAMES.get(rgb, "#{:02x}{:02x}{:02x}".format(*(min(max(v, 0), 255) for v in rgb)))


def imagej_luts(ij: Mapping[str, Any] | None, n_channels: int) -> tuple[str, ...] | None:
    """The display colour of each channel (ImageJ composite LUTs), None unless there is one per channel."""
    luts = list((ij or {}).get("LUTs") or [])
    if n_channels < 2 or len(luts) != n_channels:
        return None
    return tuple(lut_name(lut) for lut in luts)


@dataclass(frozen=True)
class NgffImage:
    """What an OME-Zarr (NGFF 0.4 / 0.5) image group's attributes say. `axes`: the array's axes as letters of
    'TCZYX' (NGFF fixes this order, some may be absent); `path`: the full-resolution array in the group."""

    axes: str
    path: str
    times: FileTimes | None
    channel_labels: tuple[str, ...]  # `omero` channel labels as written (check with `distinct_names`)
    version: str


def ngff_attrs(attrs: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(the OME metadata, NGFF version): 0.5 keeps it under 'ome', 0.4 at the top level."""
    if isinstance(attrs.get("ome"), Mapping):
        ome = dict(attrs["ome"])
        return ome, str(ome.get("version", "0.5"))
    ms = attrs.get("multiscales") or [{}]
    return dict(attrs), str(ms[0].get("version", "0.4") if isinstance(ms[0], Mapping) else "0.4")


def _scale(transforms: Any, n: int) -> list[float]:
    for t in transforms or []:
        if isinstance(t, Mapping) and t.get("type") == "scale" and len(t.get("scale", [])) == n:
            return [float(v) for v in t["scale"]]
    return [1.0] * n


def ngff_image(attrs: Mapping[str, Any], n_frames: int | None = None) -> NgffImage | None:
    """An NGFF image's axes, full-resolution array, time step (the t axis's unit times its scale, full
    resolution and multiscale-level transforms combined) and `omero` channel labels; None when the attributes
    hold no multiscales (a plate or well group, or not NGFF at all)."""
    ome, version = ngff_attrs(attrs)
    multiscales = ome.get("multiscales")
    if not multiscales or not isinstance(multiscales[0], Mapping):
        return None
    ms = multiscales[0]
    axes_meta = ms.get("axes") or [{"name": a} for a in "tczyx"]  # NGFF 0.3 and older: always 5-D tczyx
    names = [(a.get("name") if isinstance(a, Mapping) else str(a)) or "" for a in axes_meta]
    letters = "".join(n.upper()[:1] for n in names)
    datasets = ms.get("datasets") or [{}]
    n = len(letters)
    scale = [a * b for a, b in zip(_scale(datasets[0].get("coordinateTransformations"), n),
                                   _scale(ms.get("coordinateTransformations"), n), strict=True)]
    times = None
    if "T" in letters:
        k = letters.index("T")
        unit = axes_meta[k].get("unit") if isinstance(axes_meta[k], Mapping) else None
        per_unit = hours_per_unit(unit) if unit else None
        if per_unit is not None and scale[k] > 0 and (n_frames is None or n_frames > 1):
            times = FileTimes(scale[k] * per_unit, None, "NGFF axes")
    omero = ome.get("omero") or {}
    labels = tuple(str(c.get("label") or "") for c in omero.get("channels") or [] if isinstance(c, Mapping))
    return NgffImage(letters, str(datasets[0].get("path", "0")), times, labels, version)


def ngff_plate_images(
    plate_attrs: Mapping[str, Any], well_attrs: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, str, str]]:
    """(well name, field, image path within the plate) for every image of an NGFF HCS plate; `well_attrs`
    maps each well's path ('B/2') to that well group's attributes."""
    ome, _ = ngff_attrs(plate_attrs)
    out = []
    for w in (ome.get("plate") or {}).get("wells") or []:
        wpath = str(w.get("path", ""))
        row, _, col = wpath.partition("/")
        wome, _ = ngff_attrs(well_attrs.get(wpath) or {})
        for k, img in enumerate((wome.get("well") or {}).get("images") or []):
            out.append((f"{row.upper()}{int(col) if col.isdigit() else col}", str(k), f"{wpath}/{img.get('path')}"))
    return out
