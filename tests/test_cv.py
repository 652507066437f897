"""cellmtl cv: fold assignment (pure), an interrupted cv resumed, the summary, bad input."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from cellmtl.cli import main
from cellmtl.config import load_config
from cellmtl.cv import fold_assignment, run_cv
from cellmtl.data.manifest import StackRecord
from cellmtl.errors import BadInputError
from tests.conftest import write_config


def rec(sid: str, infected: bool, group: str) -> StackRecord:
    return StackRecord(sid, f"{sid}.tif", infected, 0.0, 1.0, 0.0, None, group, {})


def test_fold_assignment_keeps_groups_and_both_classes():
    # 5 plates of unequal size; plate p4 only mock, p0 mixed
    records = [rec(f"s{i}", i % 3 == 0, f"p{i % 5}") for i in range(20)]
    for seed in range(5):
        folds = fold_assignment(records, 3, seed=seed)
        assert set(folds.values()) == {1, 2, 3} and set(folds) == {r.stack_id for r in records}
        by_group: dict[str, set[int]] = {}
        for r in records:
            by_group.setdefault(r.group, set()).add(folds[r.stack_id])
        assert all(len(f) == 1 for f in by_group.values())  # a group is never split
        for f in (1, 2, 3):
            assert {r.infected for r in records if folds[r.stack_id] == f} == {True, False}
    assert fold_assignment(records, 3, seed=1) == fold_assignment(records, 3, seed=1)


def test_fold_assignment_says_why_it_is_impossible():
    records = [rec("a", True, "g1"), rec("b", False, "g1"), rec("c", True, "g2"), rec("d", False, "g3")]
    with pytest.raises(BadInputError, match="infected"):
        fold_assignment(records, 3, seed=0)  # only 2 groups hold infected stacks
    with pytest.raises(BadInputError, match="at least 4 groups"):
        fold_assignment(records, 4, seed=0)


@pytest.mark.slow
def test_cv_resumes_missing_folds_and_summarises(tmp_path, tiny_experiment, capsys, monkeypatch):
    monkeypatch.setattr("cellmtl.training.loop.write_run_plots", lambda *a, **k: [])  # plots are tested elsewhere
    # 4 groups of (infected, mock); g3 (s6, s7) is held out as test, so each of 3 folds is one group
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_experiment, data={"test_stacks": ["s6", "s7"]},
                                   training={"epochs": 1, "bn_recalibration_samples": 0}))

    def stop_after_first(fold: int, seed: int, run: Path) -> None:
        raise KeyboardInterrupt  # as if killed after fold 1

    with pytest.raises(KeyboardInterrupt):
        run_cv(cfg, folds=3, on_fold_done=stop_after_first)
    cv_dir = next((Path(cfg.output_dir) / cfg.experiment_name).glob("cv-*"))
    assert not (cv_dir / "cv_summary.json").exists()
    orphan = cv_dir / "fold2" / "20000101-000000-000000"  # fold 2 killed before its first epoch ended
    orphan.mkdir(parents=True)
    (orphan / "config.yaml").write_text("seed: 0\n")
    (orphan / "train.log").write_text("stacks: ...\n")

    trained: list[int] = []
    again = run_cv(cfg, folds=3, on_fold_done=lambda f, s, r: trained.append(f))  # same command, same folder
    assert again == cv_dir and trained == [2, 3]
    runs = sorted(cv_dir.glob("fold*/*/results.json"))
    assert [p.parent.parent.name for p in runs] == ["fold1", "fold2", "fold3"]
    assert not orphan.exists() and len([p for p in (cv_dir / "fold2").iterdir() if p.is_dir()]) == 1

    val_sets = []
    for p in runs:
        with (p.parent / "splits.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        val_sets.append({r["stack_id"] for r in rows if r["split"] == "val"})
        assert {r["stack_id"] for r in rows if r["split"] == "test"} == {"s6", "s7"}
    assert sum(len(v) for v in val_sets) == len(set().union(*val_sets)) == 6  # no stack validated twice

    s = json.loads((cv_dir / "cv_summary.json").read_text())
    assert s["runs_done"] == 3 and len(s["per_fold"]) == 3
    for name in ("cls_auc", "cls_acc", "reg_mae", "total_loss"):
        assert s["val"][name]["n"] == 3 and s["val"][name]["std"] is not None
    assert "test" in s and s["test"]["reg_mae"]["n"] == 3
    with (cv_dir / "predictions_oof.csv").open() as fh:
        oof = list(csv.DictReader(fh))
    assert len(oof) == s["oof_frames"] and {r["stack_id"] for r in oof} == set().union(*val_sets)
    assert s["oof_pooled"]["cls_auc"] is not None and "± " in (cv_dir / "cv_summary.md").read_text()
    # the pooled out-of-fold frames also say whether the time head reads the clock inside each stack
    assert all(isinstance(s["oof_pooled"][k], float) for k in ("reg_slope_infected", "reg_slope_uninfected"))
    assert s["val"]["reg_slope_infected"]["n"] == 3
    md = (cv_dir / "cv_summary.md").read_text()
    fold_header = next(line for line in md.splitlines() if line.startswith("| fold |"))
    assert "| reg_slope_infected | reg_slope_uninfected | run |" in fold_header  # per fold too, not only pooled

    # nothing left to train: --resume only rewrites the summary, and prints the folder last
    assert main(["cv", "--resume", str(cv_dir)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(cv_dir)
    assert len(list(cv_dir.glob("fold*/*/results.json"))) == 3


def test_cv_cli_bad_input(tmp_path, tiny_config, capsys):
    assert main(["cv", "--config", str(tiny_config), "--folds", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cv: 5 folds need at least 5 groups")
    assert main(["cv", "--resume", str(tmp_path)]) == 2
    assert "cv_plan.json" in capsys.readouterr().err


@pytest.mark.slow
def test_cv_seeds_repeat_each_fold_on_the_same_split(tmp_path, tiny_experiment, monkeypatch):
    monkeypatch.setattr("cellmtl.training.loop.write_run_plots", lambda *a, **k: [])
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_experiment, seed=7,
                                   training={"epochs": 1, "bn_recalibration_samples": 0}))
    cv_dir = run_cv(cfg, folds=2, seeds=2)
    runs = sorted(cv_dir.glob("fold*/*/results.json"))
    assert [p.parent.parent.name for p in runs] == ["fold1-seed1", "fold1-seed2", "fold2-seed1", "fold2-seed2"]
    seeds, vals = [], []
    for p in runs:
        seeds.append(yaml.safe_load((p.parent / "config.yaml").read_text())["seed"])
        with (p.parent / "splits.csv").open() as fh:
            vals.append(frozenset(r["stack_id"] for r in csv.DictReader(fh) if r["split"] == "val"))
    assert seeds == [7, 8, 7, 8]
    assert vals[0] == vals[1] and vals[2] == vals[3] and not vals[0] & vals[2]  # seeds share their fold's split
    s = json.loads((cv_dir / "cv_summary.json").read_text())
    assert s["runs_done"] == 4 and s["val"]["cls_auc"]["n"] == 4


def test_cv_pool_follows_the_config_lists_rules():
    from cellmtl.config import config_from_dict
    from cellmtl.cv import cv_pool

    records = [rec(f"s{i}", i % 2 == 0, f"g{i // 2}") for i in range(8)]

    def pool(**lists):
        cfg = config_from_dict({"data": {"manifest": "m.csv", **lists}})
        used, test = cv_pool(cfg, records)
        return sorted(r.stack_id for r in used), sorted(test)

    assert pool(test_stacks=["s6", "s7"]) == (["s0", "s1", "s2", "s3", "s4", "s5"], ["s6", "s7"])
    assert pool(train_stacks=["s0", "s1"], val_stacks=["s2", "s3"], test_stacks=["s4"]) == (
        ["s0", "s1", "s2", "s3"], ["s4"])  # unlisted stacks are left out when a train list is given
    with pytest.raises(BadInputError, match="already in train"):
        pool(train_stacks=["s0", "s1"], test_stacks=["s1"])  # one stack cannot be both pooled and held out
    with pytest.raises(BadInputError, match="unknown stack_id 'zz'"):
        pool(val_stacks=["zz"])
