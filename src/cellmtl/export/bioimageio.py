"""`cellmtl export --format bioimageio`: a bioimage.io model package (format 0.5) others can run.

The package holds ONNX weights of the network alone; the checkpoint's normaliser is declared as bioimage.io
preprocessing (not baked into the graph), so any bioimage.io consumer reproduces it and a reader of rdf.yaml
sees it:

    ensure_dtype float32 -> scale_range (per_image: each image's per-channel percentiles)
                          | scale_linear (dataset: the fixed per-channel lo/hi from training) -> ensure_dtype float32

Input `image` `[batch, channel, y, x]` uint16 raw intensities, already resized to the checkpoint's image_size
(resizing is not a bioimage.io operation; `cellmtl predict` resizes with antialiased bilinear). Output
`prediction` `[batch, channel]` float32 with channels `prob_infected` and/or `time_hours` (hours since onset
for infected, since experiment start for uninfected). The expected test output is computed by cellmtl's own
PyTorch path (Normalizer + model), so `bioimageio.core.test_model` passing means the package reproduces
`cellmtl predict` on the test image.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cellmtl import __version__
from cellmtl.checkpoints import Checkpoint
from cellmtl.data.transforms import Normalizer
from cellmtl.errors import BadInputError, ExportError
from cellmtl.export.onnx import OPSET, onnx_graph, require_onnx
from cellmtl.models import MultiTaskNet
from cellmtl.reports.plots import new_figure

TEST_FRAME_HOUR = 12.0  # the synthetic test frame: an infected stack, 12 h after start, onset at 2 h


class PackageWrapper(nn.Module):
    """One `[N, K]` tensor out (K = the tasks the model has), because a bioimage.io output needs named
    channels along an axis rather than a tuple of 1-D tensors."""

    def __init__(self, model: MultiTaskNet) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.model(image)
        cols = []
        if "infected" in out:
            cols.append(torch.sigmoid(out["infected"]))
        if "time" in out:
            cols.append(self.model.time_hours(out["time"]))
        return torch.stack(cols, dim=1)


def output_names(mode: str) -> list[str]:
    return {"multitask": ["prob_infected", "time_hours"], "classification": ["prob_infected"],
            "regression": ["time_hours"]}[mode]


def test_image(in_chans: int, channels: list[int], size: int) -> np.ndarray:
    """A synthetic uint16 `[1, C, size, size]` frame from cellmtl.synth (infected well), so the package's
    test tensors look like microscopy rather than noise. Channel k is the synth channel `channels[k]` when
    that exists (synth has 2), else channel k mod 2."""
    from cellmtl.synth import render_stack

    rng = np.random.default_rng(0)
    stack = render_stack(rng, n_frames=1, size=size, start_hour=TEST_FRAME_HOUR, frame_interval_hours=1.0, onset=2.0)
    picks = [c if 0 <= c < stack.shape[1] else k % stack.shape[1] for k, c in enumerate(channels[:in_chans])]
    picks += [k % stack.shape[1] for k in range(len(picks), in_chans)]
    return np.ascontiguousarray(stack[0][picks][None])


def reference_output(model: MultiTaskNet, normalizer: Normalizer, image: np.ndarray) -> np.ndarray:
    """cellmtl's own path (float32 conversion, Normalizer, PyTorch model) on `[1, C, H, W]`: `[1, K]` float32."""
    x = normalizer(torch.from_numpy(image[0].astype(np.float32)))[None]
    with torch.no_grad():
        return PackageWrapper(model)(x).numpy().astype(np.float32)


def preprocessing(normalizer: Normalizer) -> list[Any]:
    """The checkpoint's normaliser as bioimage.io steps, framed by explicit float32 casts (without the first
    one a uint16 input stays uint16 through the pipeline and ONNX Runtime rejects it)."""
    from bioimageio.spec.model import v0_5 as bio

    if normalizer.mode == "per_image":
        lo, hi = normalizer.percentiles
        norm = bio.ScaleRangeDescr(kwargs=bio.ScaleRangeKwargs(
            axes=[bio.AxisId("y"), bio.AxisId("x")], min_percentile=lo, max_percentile=hi, eps=1e-6))
    else:
        lo_v, hi_v = np.asarray(normalizer.lo, np.float64), np.asarray(normalizer.hi, np.float64)
        gain = 1.0 / np.maximum(hi_v - lo_v, 1e-6)
        norm = bio.ScaleLinearDescr(kwargs=bio.ScaleLinearAlongAxisKwargs(
            axis=bio.AxisId("channel"), gain=gain.tolist(), offset=(-lo_v * gain).tolist()))
    cast = bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32"))
    return [cast, norm, cast]


def write_cover(image: np.ndarray, expected: np.ndarray, names: list[str], path: Path) -> Path:
    """A 2:1 PNG: the test image's channels (each 1-99.8 % stretched) and the model's outputs on it."""
    chans = image[0].astype(np.float32)
    fig = new_figure(8, 4)
    axes = fig.subplots(1, len(chans) + 1)
    for k, (ax, ch) in enumerate(zip(axes, chans, strict=False)):
        lo, hi = np.percentile(ch, [1, 99.8])
        ax.imshow(np.clip((ch - lo) / max(hi - lo, 1e-6), 0, 1), cmap="gray")
        ax.set_title(f"channel {k}")
        ax.axis("off")
    axes[-1].axis("off")
    text = "\n".join(f"{n} = {v:.3g}" for n, v in zip(names, expected[0], strict=True))
    axes[-1].text(0.05, 0.5, "cellmtl\n\n" + text, fontsize=12, va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    fig.clear()
    return path


def write_readme(ckpt: Checkpoint, names: list[str], path: Path) -> Path:
    norm = ckpt.normalizer.to_dict()
    named = ckpt.channel_names
    names_txt = f": {', '.join(named)}, matched by name across files" if named else ""
    size = ckpt.input_size
    path.write_text(f"""# cellmtl infection and time model

Predicts from one microscopy image whether its cells are infected (`prob_infected`, 0-1) and a time in
hours (`time_hours`: since infection onset for infected images, since experiment start for uninfected ones).
Exported by cellmtl {__version__} from a checkpoint trained with backbone `{ckpt.model_spec.name}`,
task mode `{ckpt.model_spec.mode}`.

## Inputs and outputs

- input `image`: `[batch, channel, y, x]`, uint16 raw intensities, {len(ckpt.channels)} channel(s) (the
  training data's channels {list(ckpt.channels)}{names_txt}), y = x = {size} px. Resize larger images to {size} x {size}
  first (cellmtl uses antialiased bilinear resizing); the model was trained at that size.
- preprocessing (declared in rdf.yaml): cast to float32, then the training normalisation
  (`{norm['mode']}`, percentiles {norm['percentiles']}), then float32 again.
- output `prediction`: `[batch, channel]` float32, channels {', '.join(f'`{n}`' for n in names)}.

## Validation

The test tensors are a synthetic frame from `cellmtl.synth` and the output of cellmtl's own PyTorch
pipeline on it; `bioimageio.core.test_model` checks that the packaged ONNX weights with the declared
preprocessing reproduce it. To validate the model on your own data quantitatively, label a few held-out
stacks (condition, infection onset) and run `cellmtl evaluate` or `cellmtl predict` on them: report the
classification AUC and accuracy, the MAE of `time_hours` in hours per class, and per stack whether the
condition is right and how far `est_onset_hour` is from the true onset. Images from another microscope,
cell line or virus than the training data need such a check before the outputs are trusted.
""")
    return path


def input_channel_names(ckpt: Checkpoint) -> list[str]:
    """The training data's channel names where the manifest named them and bioimage.io accepts them all as
    identifiers, else `channel<i>` after the channel indices."""
    from bioimageio.spec.model import v0_5 as bio

    names = ckpt.channel_names
    if names:
        try:
            return [str(bio.Identifier(n)) for n in names]
        except ValueError:
            pass
    return [f"channel{c}" for c in ckpt.channels]


def build_description(ckpt: Checkpoint, staging: Path, onnx_path: Path) -> Any:
    """The ModelDescr for files already written into `staging`."""
    from bioimageio.spec.model import v0_5 as bio

    spec = ckpt.model_spec
    size = ckpt.input_size
    names = output_names(spec.mode)
    normalizer = ckpt.normalizer
    channel_names = input_channel_names(ckpt)
    image = bio.InputTensorDescr(
        id=bio.TensorId("image"),
        description="raw intensities, resized to the training image size",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(n) for n in channel_names]),
              bio.SpaceInputAxis(id=bio.AxisId("y"), size=size), bio.SpaceInputAxis(id=bio.AxisId("x"), size=size)],
        test_tensor=bio.FileDescr(source=staging / "test_input.npy"),
        data=bio.IntervalOrRatioDataDescr(type="uint16"),
        preprocessing=preprocessing(normalizer),
    )
    prediction = bio.OutputTensorDescr(
        id=bio.TensorId("prediction"),
        description="prob_infected (0-1) and/or time_hours (h)",
        axes=[bio.BatchAxis(), bio.ChannelAxis(channel_names=[bio.Identifier(n) for n in names])],
        test_tensor=bio.FileDescr(source=staging / "test_output.npy"),
        data=bio.IntervalOrRatioDataDescr(type="float32"),
        postprocessing=[bio.EnsureDtypeDescr(kwargs=bio.EnsureDtypeKwargs(dtype="float32"))],
    )
    return bio.ModelDescr(
        name=f"cellmtl {spec.mode} {spec.name}",
        description="Is this microscopy image from an infected well, and how many hours since onset (or start)?",
        authors=[bio.Author(name="cellmtl")],
        cite=[bio.CiteEntry(text="cellmtl: multi-task infection and time prediction from microscopy",
                            url="https://github.com/cellmtl/cellmtl")],
        license="MIT",
        documentation=bio.FileDescr(source=staging / "README.md"),
        covers=[bio.FileDescr(source=staging / "cover.png")],
        tags=["infection", "time-lapse", "classification", "regression", "fluorescence-light-microscopy"],
        inputs=[image],
        outputs=[prediction],
        weights=bio.WeightsDescr(onnx=bio.OnnxWeightsDescr(source=onnx_path, opset_version=OPSET)),
        version="0.1.0",
    )


def refuse_unsupported(ckpt: Checkpoint, checkpoint: str | Path) -> None:
    """Checkpoints whose preprocessing bioimage.io tools cannot reproduce are bad input, not a wrong package."""
    if ckpt.normalizer.floor:
        # (x - lo) / (hi - lo + floor) would be scale_range's eps, but bioimageio.core 0.11 ignores eps
        # (ScaleRange.from_proc_descr drops it), so the package would not reproduce this model.
        raise BadInputError(
            f"checkpoint {checkpoint} uses data.normalization.range_floor, which bioimage.io tools cannot "
            "reproduce yet; export it with --format onnx, or train with range_floor: 0"
        )
    if ckpt.temporal_context_hours:
        # a bioimage.io model takes one image; stacking earlier frames is a step its tools cannot do
        raise BadInputError(
            f"checkpoint {checkpoint} stacks frames of data.temporal_context_hours; bioimage.io packages "
            "take one image, so export it with --format onnx (its metadata lists the offsets)"
        )


def check_out(out: Path) -> None:
    """A zip path, a new or empty folder, or an earlier package's folder (overwritten); never someone's data."""
    if out.suffix == ".zip":
        if out.is_dir():
            raise BadInputError(f"--out {out} is a folder, not a zip file")
        return
    if out.is_file():
        raise BadInputError(f"--out {out} is a file; give a folder, or a path ending in .zip")
    if out.is_dir() and any(out.iterdir()) and not (out / "rdf.yaml").is_file():
        raise BadInputError(f"--out {out} is a non-empty folder that holds no bioimage.io package")


def export_bioimageio(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the package to `out`: a folder, or a zip when `out` ends in `.zip`. Returns `out`."""
    try:
        from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder
    except ImportError:
        raise BadInputError("export --format bioimageio needs bioimageio.core: pip install 'cellmtl[export]'") from None
    require_onnx()
    out = Path(out)
    check_out(out)
    ckpt = Checkpoint.load(checkpoint)
    refuse_unsupported(ckpt, checkpoint)
    model = ckpt.network()
    size, in_chans = ckpt.input_size, model.spec.in_chans
    with tempfile.TemporaryDirectory(prefix="cellmtl_bioimageio_") as tmp:
        staging = Path(tmp)
        image = test_image(in_chans, list(ckpt.channels), size)
        expected = reference_output(model, ckpt.normalizer, image)
        np.save(staging / "test_input.npy", image)
        np.save(staging / "test_output.npy", expected)
        names = output_names(model.spec.mode)
        write_cover(image, expected, names, staging / "cover.png")
        write_readme(ckpt, names, staging / "README.md")
        onnx_path = onnx_graph(PackageWrapper(model), in_chans, size, staging / "weights.onnx", ["prediction"])
        descr = build_description(ckpt, staging, onnx_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".zip":
            save_bioimageio_package(descr, output_path=out)
        else:
            save_bioimageio_package_as_folder(descr, output_path=out)
    validate_package(out)
    return out


def validate_package(package: Path) -> None:
    """Run `bioimageio.core.test_model` on the package just written (offline: every file is local), so the user
    gets the verdict at once; `bioimageio test <package>` gives the same outside cellmtl."""
    from bioimageio.core import test_model

    summary = test_model(package / "rdf.yaml" if package.is_dir() else package)
    if summary.status != "passed":
        failed = "; ".join(
            f"{d.name}: {str(d.errors[0].msg)[:200] if d.errors else d.status}"
            for d in summary.details
            if d.status == "failed"
        )
        raise ExportError(f"the bioimage.io package {package} failed bioimageio.core test_model ({failed})")
    logging.getLogger(__name__).info("bioimageio.core test_model: passed (%s)", package)
