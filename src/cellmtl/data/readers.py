"""Readers for time-lapse stacks: one TIFF (multi-page, ImageJ hyperstack, OME-TIFF), a folder of per-time-point
images (each file one time point; its planes are channels, or Z where it says so), a frame list written by
`cellmtl manifest` (one file per channel and time point, e.g. a plate imager's export), or a single 2-D image.

Every reader yields float32 ``[C, Y, X]`` frames with raw intensities (no rescaling); a Z axis is max-projected.
Frames are read lazily so that a `StackReader` can be shipped to DataLoader workers. Every bad input raises
`BadInputError` naming the file (and the frame or page where relevant).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from cellmtl.data.filemeta import (
    FileTimes,
    NgffImage,
    distinct_names,
    imagej_channel_names,
    imagej_luts,
    imagej_times,
    ngff_attrs,
    ngff_image,
    ome_channel_names,
    ome_times,
    regular_or_irregular,
)
from cellmtl.errors import BadInputError
from cellmtl.fileio import write_text

TIFF_SUFFIXES = (".tif", ".tiff")
FRAME_LIST_SUFFIX = ".frames.json"  # `cellmtl manifest`'s stacks of per-channel, per-time-point files
FRAME_LIST_KEY = "cellmtl_frame_list"  # the format version marker inside one
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
SUPPORTED_IMAGE_SUFFIXES = TIFF_SUFFIXES + PIL_SUFFIXES
# Vendor formats without a permissive reader tested here (no sample file could be had): named in the error.
VENDOR_SUFFIXES = {".nd2": "Nikon NIS-Elements (.nd2)", ".czi": "Zeiss ZEN (.czi)", ".lif": "Leica LAS X (.lif)"}
SUPPORTED_DTYPES = frozenset({"uint8", "uint16", "int8", "int16", "uint32", "int32", "float16", "float32", "float64"})
# tifffile axis letters we understand; 'S' (RGB samples) counts as channels. Others ('I', 'Q', ...) are unknown.
_CANON = {"T": "T", "Z": "Z", "C": "C", "S": "C", "Y": "Y", "X": "X"}


@dataclass(frozen=True)
class StackInfo:
    """What `probe_stack` found; all a `StackReader` needs (so it pickles cheaply)."""

    path: str  # absolute path as string
    format: str  # 'imagej' | 'ome' | 'tiff' | 'folder' | 'frames' | 'zarr' | 'image'
    n_frames: int  # T
    n_channels: int  # C (1 if no channel axis; RGB samples 'S' count as channels)
    height: int  # Y
    width: int  # X
    dtype: str  # numpy dtype name of the stored data, e.g. 'uint16'
    axes: str  # the file's own axes string, e.g. 'TCYX', 'TZCYX', 'YX'; 'T' + per-file axes for folders
    n_z: int = 1  # Z planes (max-projected on read)
    # Set when this file orders its channels differently from the experiment's reference stack (channels matched
    # by name, `cellmtl.data.channels`): the file channel of each reference channel index, -1 where it has none.
    channel_order: tuple[int, ...] | None = None
    # from OME metadata or ImageJ slice labels, when they name every channel distinctly
    channel_names: tuple[str, ...] | None = None
    file_times: FileTimes | None = None  # frame times the file records (ImageJ finterval, OME TimeIncrement/DeltaT)
    luts: tuple[str, ...] | None = None  # ImageJ composite display colours, one per channel ('magenta', ...)
    rgb: bool = False  # the channels are the RGB(A) samples of a colour image


def natural_key(name: str) -> list[Any]:
    """Sort key so that 'frame_2' comes before 'frame_10' (digit runs compare as numbers)."""
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", name)]


def list_folder_images(folder: str | Path) -> list[Path]:
    """Image files of a folder (not recursive, hidden files skipped), natural-sorted by name."""
    files = [
        f
        for f in Path(folder).iterdir()
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in SUPPORTED_IMAGE_SUFFIXES
    ]
    return sorted(files, key=lambda f: (natural_key(f.name), f.name))


def map_axes(axes: str, shape: Sequence[int], path: str | Path) -> str:
    """Map tifffile axes to one of 'TZCYX' per axis, '1' for a droppable singleton.

    A single unknown non-singleton axis ('I' image sequence, 'Q' unknown, ...) is taken as T when there is no T.
    """
    out = [_CANON.get(a, "1" if n == 1 else "?") for a, n in zip(axes, shape, strict=True)]
    unknown = "".join(a for a, o in zip(axes, out, strict=True) if o == "?")
    if unknown and ("T" in out or len(unknown) > 1):
        raise BadInputError(
            f"cannot interpret axes {axes!r} (shape {tuple(shape)}) of {path}: unknown axes {unknown!r}"
        )
    letters = "".join("T" if o == "?" else o for o in out)
    if letters.count("Y") != 1 or letters.count("X") != 1:
        raise BadInputError(f"axes {axes!r} (shape {tuple(shape)}) of {path} lack a single Y and X axis")
    return letters


def frame_file_letters(letters: str) -> str:
    """Axes of one file in a folder of per-time-point files: the file is one time point, so planes that
    tifffile counts as T (or as an unnamed page sequence) are its channels; Z stays Z where the file says so."""
    return letters.replace("T", "C")


def _info_from_axes(
    path: Path, fmt: str, axes: str, shape: Sequence[int], dtype: np.dtype, frame_file: bool = False
) -> StackInfo:
    """Build a StackInfo after checking dtype, emptiness and axes (`frame_file`: see `frame_file_letters`)."""
    if dtype.name not in SUPPORTED_DTYPES:
        raise BadInputError(f"unsupported dtype {dtype.name} in {path}")
    if math.prod(shape) == 0:
        raise BadInputError(f"empty stack (shape {tuple(shape)}, axes {axes!r}) in {path}")
    letters = map_axes(axes, shape, path)
    if frame_file:
        letters = frame_file_letters(letters)

    def size(letter: str) -> int:
        return math.prod(n for n, o in zip(shape, letters, strict=True) if o == letter)

    rgb = any(a == "S" and n in (3, 4) for a, n in zip(axes, shape, strict=True))
    return StackInfo(str(path), fmt, size("T"), size("C"), size("Y"), size("X"), dtype.name, axes, size("Z"), rgb=rgb)


def to_zcyx(arr: np.ndarray, letters: str) -> np.ndarray:
    """View one frame (axes `letters`, no T of size > 1) as [Z, C, Y, X]; several C/S axes are merged."""
    arr = arr[tuple(0 if o in "1T" else slice(None) for o in letters)]
    letters = letters.replace("1", "").replace("T", "")
    order = sorted(range(len(letters)), key=lambda i: "ZCYX".index(letters[i]))  # stable: keeps C before S
    nz = math.prod(arr.shape[i] for i in order if letters[i] == "Z")
    arr = arr.transpose(order)
    return arr.reshape(nz, -1, arr.shape[-2], arr.shape[-1])


@contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    """Collect tifffile ERROR log records: for truncated/corrupt files tifffile often only logs and goes on."""
    messages: list[str] = []

    class _Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "invalid data type" not in record.getMessage():  # unknown private tag types are harmless
                messages.append(record.getMessage())

    handler, log = _Catch(logging.ERROR), logging.getLogger("tifffile")
    saved = (log.level, log.propagate)
    if not log.isEnabledFor(logging.ERROR):  # the app silenced tifffile: listen anyway, keep it quiet
        log.setLevel(logging.ERROR)
        log.propagate = False
    log.addHandler(handler)
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _tiff_format(series: Any) -> str:
    kind = str(getattr(series, "kind", "")).lower()
    return kind if kind in ("imagej", "ome") else "tiff"


def _check_tiff_complete(tf: tifffile.TiffFile, series: Any, path: Path) -> None:
    """Compare the series with what the file really holds; tifffile pads truncated files silently."""
    planes = series.size // series.keyframe.size
    n_ifds = len(tf.pages)  # walks the whole IFD chain, so tifffile logs a cut-off chain
    if n_ifds < planes and not (n_ifds == 1 and series.dataoffset is not None):  # 1 IFD: ImageJ/shaped >4 GB form
        raise BadInputError(f"truncated TIFF {path}: {n_ifds} of {planes} pages present")
    ij = tf.imagej_metadata or {}
    if "images" in ij and int(ij["images"]) != planes:
        raise BadInputError(f"ImageJ metadata says {ij['images']} images but series has {planes} in {path}")
    if series.dataoffset is not None:
        if series.dataoffset + series.size * series.dtype.itemsize > os.path.getsize(path):
            raise BadInputError(f"truncated TIFF {path}: pixel data extends past the end of the file")
        return
    pages = list(series.pages)
    if len(pages) != planes or any(p is None for p in pages):
        raise BadInputError(f"truncated TIFF {path}: {len(pages)} of {planes} pages present")
    for i, page in enumerate(pages):
        ends = np.add(page.dataoffsets, page.databytecounts)
        if len(ends) == 0 or int(ends.max()) > page.parent.filehandle.size:
            raise BadInputError(f"truncated TIFF {path}: data of page {i} extends past the end of the file")


def _check_last_ifd(tf: tifffile.TiffFile, path: Path) -> None:
    """The last IFD, its next-IFD pointer and its tag values must lie inside the file (catches cut-off tails)."""
    fh, fmt, index = tf.filehandle, tf.tiff, len(tf.pages) - 1
    last = tf.pages.get(index, aspage=True)
    fh.seek(last.offset)
    raw = fh.read(fmt.tagnosize)
    tagno = struct.unpack(fmt.tagnoformat, raw)[0] if len(raw) == fmt.tagnosize else 0
    ends = [last.offset + fmt.tagnosize + tagno * fmt.tagsize + fmt.offsetsize]
    ends += [tag.valueoffset + tag.valuebytecount for tag in last.tags.values()]
    if tagno == 0 or max(ends) > fh.size:
        raise BadInputError(f"truncated TIFF {path}: IFD of page {index} is cut off or empty")


def _file_metadata(tf: tifffile.TiffFile, info: StackInfo, frame_file: bool) -> StackInfo:
    """Channel names, display colours and frame times from the file's OME or ImageJ metadata."""
    ij = tf.imagej_metadata
    names = ome_channel_names(tf.ome_metadata, info.n_channels) if info.format == "ome" else None
    times = None
    if not frame_file:  # a file in a frame folder is one time point: its own times say nothing
        times = ome_times(tf.ome_metadata, info.n_frames) if info.format == "ome" else None
        times = times or (imagej_times(ij) if info.n_frames > 1 else None)
    return replace(info, channel_names=names or imagej_channel_names(ij, info.n_channels), file_times=times,
                   luts=imagej_luts(ij, info.n_channels))


def _probe_tiff(path: Path, frame_file: bool = False) -> StackInfo:
    with _tifffile_errors() as errors:
        try:
            with tifffile.TiffFile(path) as tf:
                if not tf.series:
                    raise BadInputError(f"no image series in TIFF {path}")
                series = tf.series[0]
                info = _info_from_axes(path, _tiff_format(series), series.axes, series.shape, series.dtype,
                                       frame_file)
                info = _file_metadata(tf, info, frame_file)
                _check_tiff_complete(tf, series, path)
                _check_last_ifd(tf, path)
        except BadInputError:
            raise
        except Exception as exc:
            raise BadInputError(f"cannot read TIFF {path}: {exc}") from exc
    if errors:
        raise BadInputError(f"corrupted or truncated TIFF {path}: {errors[0]}")
    return info


def _pil_array(path: Path, verify: bool = False) -> np.ndarray:
    """Decode a PNG/JPEG fully: [Y, X] or [Y, X, S]; palette images become RGB(A).

    `verify` also checks the PNG chunk CRCs, which catches truncations that Pillow's decoder lets pass.
    """
    try:
        if verify:
            with Image.open(path) as im:
                im.verify()
        with Image.open(path) as im:
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
            return np.asarray(im)
    except Exception as exc:
        raise BadInputError(f"cannot read image {path}: {exc}") from exc


def _read_tiff_file(file: Path, frame_file: bool) -> tuple[np.ndarray, str]:
    """Whole first series of a (one-frame) TIFF with its axes letters."""
    with tifffile.TiffFile(file) as tf:
        series = tf.series[0]
        letters = map_axes(series.axes, series.shape, file)
        return tf.asarray(series=0).reshape(series.shape), frame_file_letters(letters) if frame_file else letters


def _probe_file(path: Path, frame_file: bool = False) -> StackInfo:
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return _probe_tiff(path, frame_file)
    if suffix in PIL_SUFFIXES:
        arr = _pil_array(path, verify=True)
        return _info_from_axes(path, "image", "YX" if arr.ndim == 2 else "YXS", arr.shape, arr.dtype)
    if suffix in VENDOR_SUFFIXES:
        raise BadInputError(
            f"{path}: {VENDOR_SUFFIXES[suffix]} files are not read by cellmtl yet; convert them to OME-Zarr "
            "(bioformats2raw) or OME-TIFF (Fiji: File > Save As > OME-TIFF), which keep the frame times and "
            "channel names"
        )
    raise BadInputError(f"unsupported file type {suffix!r} of {path}; expected one of {SUPPORTED_IMAGE_SUFFIXES}, "
                        "a folder of them, or an OME-Zarr image")


def _probe_folder(folder: Path) -> StackInfo:
    files = list_folder_images(folder)
    if not files:
        raise BadInputError(f"no images ({', '.join(SUPPORTED_IMAGE_SUFFIXES)}) in folder {folder}")
    first = _probe_file(files[0], frame_file=True)
    key = (first.n_channels, first.n_z, first.height, first.width, first.dtype)
    for f in files:
        info = first if f == files[0] else _probe_file(f, frame_file=True)
        got = (info.n_channels, info.n_z, info.height, info.width, info.dtype)
        if got != key:
            raise BadInputError(f"{f} has (C, Z, Y, X, dtype) = {got} but {files[0].name} has {key} in folder {folder}")
    return replace(first, path=str(folder), format="folder", n_frames=len(files), axes="T" + first.axes)


@dataclass(frozen=True)
class FrameList:
    """A stack made of separate files: `files[t][c]` are the images (Z planes, max-projected) of channel c at
    time point t, with `hours[t]` hours since the experiment started; paths are absolute."""

    channels: tuple[str, ...]
    hours: tuple[float, ...]
    files: tuple[tuple[tuple[str, ...], ...], ...]


def write_frame_list(
    path: Path, channels: Sequence[str], hours: Sequence[float], files: Sequence[Sequence[Sequence[Path]]]
) -> None:
    """The stack file `cellmtl manifest` writes (`files[t][c]`: the planes of channel c at time t); paths are
    stored relative to it, so the manifest, its stack files and the images can move together."""
    rel = [[[os.path.relpath(f, path.parent) for f in planes] for planes in frame] for frame in files]
    doc = {FRAME_LIST_KEY: 1, "channels": list(channels), "hours": [float(h) for h in hours], "files": rel}
    write_text(path, json.dumps(doc, indent=1) + "\n")


def read_frame_list(path: str | Path) -> FrameList:
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        files = tuple(tuple(tuple(str((path.parent / f).resolve()) for f in planes) for planes in frame)
                      for frame in doc["files"])
        out = FrameList(tuple(str(c) for c in doc["channels"]), tuple(float(h) for h in doc["hours"]), files)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"cannot read frame list {path}: {exc.__class__.__name__}: {exc}") from None
    planes = {len(p) for frame in out.files for p in frame}
    if doc.get(FRAME_LIST_KEY) != 1 or not out.files or len(out.hours) != len(out.files) or len(planes) != 1 or any(
        len(frame) != len(out.channels) for frame in out.files
    ):
        raise BadInputError(f"frame list {path} is not a cellmtl frame list (version 1: the same planes of every "
                            "channel at every time point); write it again with cellmtl manifest")
    return out


def _probe_frame_list(path: Path) -> StackInfo:
    """Every file of the list must exist and agree in shape; each is one plane of one channel and time point."""
    frames = read_frame_list(path)
    every = [f for frame in frames.files for planes in frame for f in planes]
    missing = [f for f in every if not os.path.isfile(f)]
    if missing:
        raise BadInputError(f"frame list {path}: {len(missing)} file(s) missing, e.g. {missing[0]}")
    first = _probe_file(Path(every[0]), frame_file=True)
    key = (1, first.n_z, first.height, first.width, first.dtype)
    for f in sorted(set(every) - {every[0]}):
        info = _probe_file(Path(f), frame_file=True)
        got = (info.n_channels, info.n_z, info.height, info.width, info.dtype)
        if got != key:
            raise BadInputError(f"{f} has (C, Z, Y, X, dtype) = {got} but {every[0]} has {key} (frame list {path}; "
                                "one channel per file)")
    times = regular_or_irregular([h - frames.hours[0] for h in frames.hours], "file names")
    n_z = first.n_z * len(frames.files[0][0])
    return replace(first, path=str(path), format="frames", n_frames=len(frames.files), n_channels=len(frames.channels),
                   n_z=n_z, axes="TC" + first.axes, channel_names=distinct_names(frames.channels, len(frames.channels)),
                   file_times=times, luts=None, rgb=False)


ZARR_EXTRA = "reading OME-Zarr needs the zarr extra: pip install 'cellmtl[zarr]' (make setup installs it)"


def is_zarr_group(path: Path) -> bool:
    """A zarr v2 (.zgroup/.zattrs) or v3 (zarr.json) group: an OME-Zarr image, well or plate."""
    return path.is_dir() and any((path / m).is_file() for m in (".zattrs", ".zgroup", "zarr.json"))


def open_zarr_group(path: str | Path) -> Any:
    try:
        import zarr
    except ImportError:
        raise BadInputError(f"{path}: {ZARR_EXTRA}") from None
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - a damaged store: one line naming it
        raise BadInputError(f"cannot open OME-Zarr {path}: {exc.__class__.__name__}: {exc}") from None


def zarr_image(path: str | Path) -> tuple[Any, NgffImage]:
    """(the full-resolution zarr array, its NGFF description) of an OME-Zarr image group."""
    group = open_zarr_group(path)
    attrs = group.attrs.asdict()
    image = ngff_image(attrs)
    if image is None:
        ome, _ = ngff_attrs(attrs)
        if "plate" in ome:
            raise BadInputError(f"{path} is an OME-Zarr HCS plate; list its wells and fields with: cellmtl manifest "
                                f"--images {path} --plate-map PLATE.csv --out manifest.csv")
        if "well" in ome:
            raise BadInputError(f"{path} is an OME-Zarr well; give one of its images, e.g. {Path(path) / '0'}")
        raise BadInputError(f"{path} is a zarr group without NGFF multiscales metadata")
    try:
        arr = group[image.path]
    except Exception as exc:  # noqa: BLE001
        raise BadInputError(f"OME-Zarr {path}: no array {image.path!r} ({exc.__class__.__name__})") from None
    if len(image.axes) != arr.ndim or not set(image.axes) <= set("TCZYX"):
        raise BadInputError(f"OME-Zarr {path}: axes {image.axes!r} do not fit the array of shape {arr.shape}")
    return arr, image


def _probe_zarr(path: Path) -> StackInfo:
    arr, image = zarr_image(path)
    info = _info_from_axes(path, "zarr", image.axes, arr.shape, np.dtype(arr.dtype))
    times = image.times if info.n_frames > 1 else None
    return replace(info, file_times=times, channel_names=distinct_names(image.channel_labels, info.n_channels))


def probe_stack(path: str | Path) -> StackInfo:
    """Open the file/folder, validate, return metadata. Raises BadInputError."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise BadInputError(f"no such file or folder: {p}")
    if is_zarr_group(p):
        return _probe_zarr(p)
    if p.is_dir():
        return _probe_folder(p)
    return _probe_frame_list(p) if p.name.endswith(FRAME_LIST_SUFFIX) else _probe_file(p)


def _lead_axes(shape: Sequence[int], page_size: int) -> int:
    """Number of leading series axes that index pages (pages iterate over all axes before Y, X[, S])."""
    acc = 1
    for i in range(len(shape) - 1, -1, -1):
        acc *= shape[i]
        if acc == page_size:
            return i
    return 0


class StackReader:
    """Reads single frames lazily.

    Picklable: holds only the StackInfo; the open TiffFile (or np.memmap) is created on first read in the
    current process (DataLoader worker), re-created after a fork, and dropped in __getstate__.
    """

    def __init__(self, info: StackInfo):
        self.info = info
        self._reset()

    def _reset(self) -> None:
        self._pid: int | None = None
        self._tf: tifffile.TiffFile | None = None
        self._mm: np.ndarray | None = None
        self._fd: int | None = None  # contiguous data with T first: frames read by os.pread
        self._frame: tuple[int, np.dtype, tuple[int, ...]] | None = None  # (data offset, dtype, frame shape)
        self._files: list[Path] | None = None
        self._frame_files: tuple[tuple[tuple[str, ...], ...], ...] | None = None  # frame lists: [t][c][z] paths
        self._zarr: Any = None  # OME-Zarr: the full-resolution array; indexing reads only the chunks it touches
        self._letters, self._shape, self._lead = "", (), 0

    def __getstate__(self) -> dict[str, Any]:
        return {"info": self.info}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.info = state["info"]
        self._reset()

    def __enter__(self) -> StackReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the file handle / memmap (reopened on the next read)."""
        if self._pid == os.getpid():
            if self._tf is not None:
                self._tf.close()
            if self._fd is not None:
                os.close(self._fd)
        self._reset()

    def _open(self) -> None:
        """Open the file in this process: memmap for contiguous uncompressed data, else keep the TiffFile."""
        if self._pid is not None and self._pid != os.getpid():
            self._reset()  # forked: never share a file position with the parent
        if self._pid is not None:
            return
        path = self.info.path
        if self.info.format == "folder":
            self._files = list_folder_images(path)
            if len(self._files) != self.info.n_frames:
                raise BadInputError(f"folder {path} now has {len(self._files)} images, probed {self.info.n_frames}")
        elif self.info.format == "frames":
            self._frame_files = read_frame_list(path).files
        elif self.info.format == "zarr":
            self._zarr, image = zarr_image(path)
            self._letters = image.axes
        elif self.info.format != "image":
            try:
                tf = tifffile.TiffFile(path)
                series = tf.series[0]
                self._letters, self._shape = map_axes(series.axes, series.shape, path), tuple(series.shape)
                self._lead = _lead_axes(self._shape, series.keyframe.size)
                if series.dataoffset is not None:
                    dtype = np.dtype(tf.byteorder + series.dtype.char)
                    if self._letters.startswith("T"):
                        # pread of one frame's bytes: no mapping that would keep every touched page in RSS
                        self._fd = os.open(path, os.O_RDONLY)
                        self._frame = (int(series.dataoffset), dtype, self._shape[1:])
                    else:
                        self._mm = np.memmap(path, dtype, mode="r", offset=series.dataoffset, shape=self._shape)
                    tf.close()
                else:
                    self._tf = tf
            except BadInputError:
                raise
            except Exception as exc:
                raise BadInputError(f"cannot open TIFF {path}: {exc}") from exc
        self._pid = os.getpid()

    def _raw_frame(self, t: int) -> tuple[np.ndarray, str, str]:
        """Stored pixels of frame t with their axes letters (T removed), plus the file to blame."""
        if self._frame_files is not None:  # one file per channel (and plane): [C, Z, Y, X]
            channels = []
            for planes in self._frame_files[t]:
                zs = [to_zcyx(*self._single_file(Path(f), frame_file=True)[:2])[:, 0] for f in planes]
                channels.append(np.concatenate(zs))
            return np.stack(channels), "CZYX", self._frame_files[t][0][0]
        if self._zarr is not None:
            letters = self._letters
            key = tuple(t if a == "T" else slice(None) for a in letters)
            return np.asarray(self._zarr[key]), letters.replace("T", ""), self.info.path
        if self.info.format in ("folder", "image"):
            file = self._files[t] if self._files is not None else Path(self.info.path)
            return self._single_file(file, frame_file=self.info.format == "folder")
        letters, ti = self._letters, self._letters.find("T")
        rest = letters.replace("T", "")
        if self._fd is not None and self._frame is not None:
            offset, dtype, shape = self._frame
            nbytes = math.prod(shape) * dtype.itemsize
            buf = os.pread(self._fd, nbytes, offset + t * nbytes)
            if len(buf) != nbytes:
                raise BadInputError(f"{self.info.path}: frame {t} is truncated ({len(buf)} of {nbytes} bytes)")
            return np.frombuffer(buf, dtype).reshape(shape), rest, self.info.path
        if self._mm is not None:
            return (self._mm if ti < 0 else np.take(self._mm, t, axis=ti)), rest, self.info.path
        assert self._tf is not None
        if ti < 0 or ti >= self._lead:  # one frame, or T inside a page: read the whole series
            arr = self._tf.asarray(series=0).reshape(self._shape)
            return (arr if ti < 0 else np.take(arr, t, axis=ti)), rest, self.info.path
        lead = self._shape[: self._lead]
        keys = np.take(np.arange(math.prod(lead)).reshape(lead), t, axis=ti).ravel().tolist()
        arr = self._tf.asarray(key=keys, series=0)
        return arr.reshape(lead[:ti] + lead[ti + 1 :] + self._shape[self._lead :]), rest, self.info.path

    @staticmethod
    def _single_file(file: Path, frame_file: bool) -> tuple[np.ndarray, str, str]:
        """One whole image file (a folder's or a frame list's) with its axes letters and its name."""
        if file.suffix.lower() in TIFF_SUFFIXES:
            return (*_read_tiff_file(file, frame_file), str(file))
        arr = _pil_array(file)
        return arr, map_axes("YX" if arr.ndim == 2 else "YXS", arr.shape, file), str(file)

    def read(self, t: int, channels: Sequence[int] | None = None) -> np.ndarray:
        """float32 [C, Y, X] for frame t (Z max-projected), only the selected channels.

        Raises BadInputError naming the file and frame if pixels are NaN/Inf or the data cannot be decoded.
        """
        info = self.info
        if not 0 <= t < info.n_frames:
            raise BadInputError(f"frame {t} out of range for {info.path} with {info.n_frames} frames")
        chans = list(range(info.n_channels)) if channels is None else [int(c) for c in channels]
        if info.channel_order is not None and channels is not None:  # reference index -> this file's index
            order = info.channel_order
            if any(not 0 <= c < len(order) or order[c] < 0 for c in chans):
                raise BadInputError(f"channels {chans} are not all matched by name in {info.path}")
            chans = [order[c] for c in chans]
        if any(not 0 <= c < info.n_channels for c in chans):
            raise BadInputError(f"channels {chans} out of range for {info.path} with {info.n_channels} channels")
        self._open()
        file = info.path
        try:
            raw, letters, file = self._raw_frame(t)
            zcyx = to_zcyx(raw, letters)
            if zcyx.shape != (info.n_z, info.n_channels, info.height, info.width):
                raise BadInputError(f"frame {t} of {file} has shape {zcyx.shape[1:]}, probed a different one")
            with np.errstate(over="ignore"):  # float64 beyond float32 range becomes Inf, reported below
                sel = zcyx if chans == list(range(info.n_channels)) else zcyx[:, chans]
                # one copy: straight to float32 when there is no Z to project (the common case)
                out = np.array(sel[0] if sel.shape[0] == 1 else sel.max(axis=0), dtype=np.float32, order="C")
        except BadInputError:
            raise
        except Exception as exc:
            raise BadInputError(f"cannot read frame {t} of {file}: {exc}") from exc
        if info.dtype.startswith("float") and not np.isfinite(out).all():
            raise BadInputError(f"NaN/Inf pixels in frame {t} of {file}")
        return out


def read_stack(path: str | Path) -> np.ndarray:
    """Whole stack as float32 [T, C, Y, X] (small files, tests, synthetic checks)."""
    info = probe_stack(path)
    with StackReader(info) as reader:
        return np.stack([reader.read(t) for t in range(info.n_frames)])


def check_finite_stack(info: StackInfo) -> None:
    """Read every frame (for `check-data`): raises BadInputError on NaN/Inf or undecodable frames."""
    with StackReader(info) as reader:
        for t in range(info.n_frames):
            reader.read(t)
