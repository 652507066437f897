"""Every bad input: exit code 2, one `error:` line naming the culprit, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from cellmtl.cli import main
from tests.conftest import write_config


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def edit_manifest(manifest: Path, fn) -> None:
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(fn(lines)) + "\n")


def check(capsys, cfg: Path, *needles: str) -> None:
    out_dir = cfg.parent / "outputs"
    code, _, err = run_cli(capsys, "check-data", "--config", str(cfg))
    assert_bad_input(code, err, *needles)
    code, _, err = run_cli(capsys, "train", "--config", str(cfg))
    assert_bad_input(code, err, *needles)
    assert not out_dir.exists() or not any(out_dir.rglob("*.pt")), "a bad input must not start a run"


def test_missing_file(capsys, tiny_config, tiny_experiment):
    (tiny_experiment.parent / "stacks" / "s3.tif").unlink()
    check(capsys, tiny_config, "s3", "not found")


def test_corrupt_tiff(capsys, tiny_config, tiny_experiment):
    (tiny_experiment.parent / "stacks" / "s2.tif").write_bytes(b"this is not a tiff at all" * 10)
    check(capsys, tiny_config, "s2")


def test_truncated_tiff(capsys, tiny_config, tiny_experiment):
    p = tiny_experiment.parent / "stacks" / "s5.tif"
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * 0.6)])
    check(capsys, tiny_config, "s5")


def test_unknown_condition(capsys, tiny_config, tiny_experiment):
    edit_manifest(tiny_experiment, lambda ls: [ls[0]] + [ls[1].replace("infected", "infectd")] + ls[2:])
    check(capsys, tiny_config, "row 2", "infectd")


def test_missing_required_column(capsys, tiny_config, tiny_experiment):
    edit_manifest(tiny_experiment, lambda ls: [ln.split(",", 1)[1] for ln in ls])
    check(capsys, tiny_config, "stack_id")


def test_duplicate_stack_id(capsys, tiny_config, tiny_experiment):
    edit_manifest(tiny_experiment, lambda ls: ls[:2] + [ls[2].replace("s1,", "s0,", 1)] + ls[3:])
    check(capsys, tiny_config, "duplicate stack_id 's0'")


def test_infected_without_onset(capsys, tmp_path, tiny_experiment):
    edit_manifest(tiny_experiment, lambda ls: [ls[0], ls[1].replace(",1,1,0,", ",,1,0,")] + ls[2:])
    cfg = write_config(tmp_path / "c.yaml", tiny_experiment, multitask={"infection_onset_hour": None})
    check(capsys, cfg, "s0", "onset")


def test_config_typo(capsys, tmp_path, tiny_experiment):
    cfg = write_config(tmp_path / "c.yaml", tiny_experiment, training={"epohcs": 3})
    check(capsys, cfg, "training.epohcs")


def test_wrong_type(capsys, tmp_path, tiny_experiment):
    cfg = write_config(tmp_path / "c.yaml", tiny_experiment, data={"image_size": "big"})
    check(capsys, cfg, "data.image_size", "'big'")


def test_set_typo(capsys, tiny_config):
    code, _, err = run_cli(capsys, "train", "--config", str(tiny_config), "--set", "optimizer.learning_rate=0.1")
    assert_bad_input(code, err, "optimizer.learning_rate")


def test_mismatched_channels(capsys, tiny_config, tiny_experiment):
    tifffile.imwrite(
        tiny_experiment.parent / "stacks" / "s4.tif",
        np.ones((6, 3, 24, 24), np.uint16),
        imagej=True,
        metadata={"axes": "TCYX"},
    )
    check(capsys, tiny_config, "s4", "3 channel")


def test_nan_pixels(capsys, tiny_config, tiny_experiment):
    arr = np.ones((6, 2, 24, 24), np.float32)
    arr[3, 1, 5, 5] = np.nan
    tifffile.imwrite(tiny_experiment.parent / "stacks" / "s6.tif", arr, imagej=True, metadata={"axes": "TCYX"})
    code, _, err = run_cli(capsys, "check-data", "--config", str(tiny_config))
    assert_bad_input(code, err, "s6", "NaN")


def test_unsupported_dtype(capsys, tiny_config, tiny_experiment):
    tifffile.imwrite(tiny_experiment.parent / "stacks" / "s7.tif", np.ones((6, 2, 24, 24), np.complex64))
    check(capsys, tiny_config, "s7")


def test_one_class_split(capsys, tmp_path, tiny_experiment):
    cfg = write_config(tmp_path / "c.yaml", tiny_experiment, data={"val_stacks": ["s0", "s2"]})
    check(capsys, cfg, "val split", "only infected")


def test_empty_split(capsys, tmp_path, tiny_experiment):
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_experiment,
        data={"train_stacks": ["s0", "s1"], "val_stacks": [], "frames": {"val": {"hour_window": [0, 1]}}},
    )
    check(capsys, cfg, "val split is empty")


def test_missing_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "check-data", "--config", str(tmp_path / "nope.yaml"))
    assert_bad_input(code, err, "nope.yaml")


def test_bad_run_folder_does_not_touch_earlier_results(capsys, tmp_path):
    code, _, err = run_cli(capsys, "evaluate", "--run", str(tmp_path / "missing_run"))
    assert_bad_input(code, err, "missing_run")


def test_console_script_exit_code_and_no_traceback(tmp_path):
    """The real process: exit code 2 and a single error line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "cellmtl", "check-data", "--config", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("cmd", ["synth", "train", "evaluate", "predict", "demo", "check-data", "cv", "explain",
                                 "compare"])
def test_every_command_has_help(capsys, cmd):
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: cellmtl" in capsys.readouterr().out


def test_yaml_is_loaded_safely(tmp_path, capsys, tiny_experiment):
    p = tmp_path / "c.yaml"
    p.write_text(
        yaml.safe_dump({"data": {"manifest": str(tiny_experiment)}})
        + "evil: !!python/object/apply:os.system ['true']\n"
    )
    code, _, err = run_cli(capsys, "check-data", "--config", str(p))
    assert_bad_input(code, err, str(p))


def test_synth_then_check_data_lists_every_stack(capsys, tmp_path):
    code, out, err = run_cli(capsys, "synth", "--out", str(tmp_path / "s"), "--stacks", "6", "--frames", "5",
                             "--size", "32")
    assert code == 0, err
    manifest = Path(out.strip().splitlines()[-1])
    assert manifest.is_file()
    code, out, err = run_cli(capsys, "check-data", "--config", str(tmp_path / "s" / "config.yaml"))
    assert code == 0, err
    lines = out.strip().splitlines()
    for k in range(6):
        row = next(ln for ln in lines if ln.startswith(f"stack{k:02d}"))
        assert " 5 " in row and " 2 " in row and "uint16" in row and "imagej" in row
    assert "no problems found" in out
    starter = yaml.safe_load((tmp_path / "s" / "config.yaml").read_text())
    assert (starter["experiment_name"], starter["output_dir"]) == ("synthetic", "outputs")  # README's run paths


@pytest.mark.slow
def test_predict_on_stacks_with_too_few_channels(capsys, tiny_config, tmp_path):
    code = main(["train", "--config", str(tiny_config), "--set", "training.epochs=1"])
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    one = tmp_path / "one_channel.tif"
    tifffile.imwrite(one, np.ones((3, 24, 24), np.uint16), imagej=True, metadata={"axes": "TYX"})
    code, _, err = run_cli(capsys, "predict", "--checkpoint", str(run / "checkpoints" / "best.pt"), str(one),
                           "--out", str(tmp_path / "p.csv"))
    assert_bad_input(code, err, "one_channel", "model's input channels")
    assert not (tmp_path / "p.csv").exists()


def test_checkpoint_path_typo_names_the_file_that_is_there(capsys, tmp_path):
    """`--checkpoint RUN/best.pt` (the file lives in RUN/checkpoints/): exit 2, and the one error line says
    which path was meant, for export and predict alike; a path with nothing near it gets no guess."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"")  # only its existence matters to the hint
    meant = str(run / "checkpoints" / "best.pt")
    code, _, err = run_cli(capsys, "export", "--checkpoint", str(run / "best.pt"), "--format", "onnx",
                           "--out", str(tmp_path / "m.onnx"))
    assert_bad_input(code, err, str(run / "best.pt"), f"did you mean {meant}?")
    assert not (tmp_path / "m.onnx").exists()
    code, _, err = run_cli(capsys, "export", "--checkpoint", str(run), "--format", "onnx",
                           "--out", str(tmp_path / "m.onnx"))
    assert_bad_input(code, err, f"did you mean {meant}?")
    stack = tmp_path / "s.tif"
    tifffile.imwrite(stack, np.ones((3, 24, 24), np.uint16), imagej=True, metadata={"axes": "TYX"})
    code, _, err = run_cli(capsys, "predict", "--checkpoint", str(run / "best.pt"), str(stack),
                           "--out", str(tmp_path / "p.csv"))
    assert_bad_input(code, err, f"did you mean {meant}?")
    assert not (tmp_path / "p.csv").exists()
    code, _, err = run_cli(capsys, "export", "--checkpoint", str(tmp_path / "nowhere.pt"), "--format", "onnx",
                           "--out", str(tmp_path / "m.onnx"))
    assert_bad_input(code, err, "checkpoint not found", "nowhere.pt")
    assert "did you mean" not in err
