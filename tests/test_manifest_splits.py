from pathlib import Path

import pytest

from cellmtl.data.manifest import StackRecord, load_manifest, records_from_dirs
from cellmtl.data.splits import assign_splits, auto_split
from cellmtl.errors import BadInputError


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "a.tif").write_bytes(b"")
    (tmp_path / "b.tif").write_bytes(b"")
    p = tmp_path / "m.csv"
    p.write_text(text)
    return p


def test_manifest_values_and_extra_columns(tmp_path):
    p = write(
        tmp_path,
        "stack_id,path,condition,infection_onset_hour,frame_interval_hours,start_hour,group,well\n"
        "a,a.tif,Infected,2.5,0.5,4,plate1,A1\n"
        "b,b.tif,MOCK,,,,plate1,A2\n",
    )
    a, b = load_manifest(p, default_interval=1.0, default_onset=0.0)
    assert a.infected and a.onset_hour == 2.5 and a.frame_interval_hours == 0.5 and a.start_hour == 4.0
    assert a.extra == {"well": "A1"} and a.group == "plate1"
    assert b.infected is False and b.onset_hour is None and b.frame_interval_hours == 1.0 and b.start_hour == 0.0
    assert Path(a.path) == tmp_path / "a.tif"


def test_default_onset_from_config(tmp_path):
    p = write(tmp_path, "stack_id,path,condition\na,a.tif,infected\n")
    (a,) = load_manifest(p, default_onset=3.0)
    assert a.onset_hour == 3.0 and a.group == "a"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("stack_id,path\na,a.tif\n", "missing required column(s) condition"),
        ("stack_id,path,condition\na,a.tif,sick\n", "row 2 (stack_id a): unknown condition 'sick'"),
        ("stack_id,path,condition\na,a.tif,mock\na,b.tif,mock\n", "row 3: duplicate stack_id 'a'"),
        ("stack_id,path,condition\na,missing.tif,mock\n", "file not found"),
        ("stack_id,path,condition,start_hour\na,a.tif,mock,soon\n", "column 'start_hour' must be a number, got 'soon'"),
        ("stack_id,path,condition,split\na,a.tif,mock,holdout\n", "unknown split 'holdout'"),
        ("stack_id,path,condition\n", "no stacks"),
    ],
)
def test_manifest_errors(tmp_path, text, needle):
    with pytest.raises(BadInputError) as exc:
        load_manifest(write(tmp_path, text))
    assert needle in str(exc.value)


def test_infected_without_onset(tmp_path):
    p = write(tmp_path, "stack_id,path,condition,infection_onset_hour\na,a.tif,infected,\n")
    with pytest.raises(BadInputError, match="stack_id a.*no infection_onset_hour"):
        load_manifest(p, default_onset=None)


def test_an_empty_onset_among_given_ones_is_warned_about(tmp_path, caplog):
    """Where some infected rows give an onset, an empty one is more likely a forgotten value than the config's
    default: a WARNING names it (and every such row). Where no row gives one, the default is the plan: no warning."""
    import logging

    for name in ("c.tif", "d.tif"):
        (tmp_path / name).write_bytes(b"")
    p = write(tmp_path, "stack_id,path,condition,infection_onset_hour\n"
                        "a,a.tif,infected,2\nb,b.tif,infected,\nc,c.tif,mock,\nd,d.tif,infected,\n")
    with caplog.at_level(logging.WARNING):
        recs = load_manifest(p, default_onset=0.0)
    assert [r.onset_hour for r in recs] == [2.0, 0.0, None, 0.0]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "infected stack_id b, d have no infection_onset_hour, unlike 1 other" in warned[0]
    assert "multitask.infection_onset_hour (0 h)" in warned[0]
    caplog.clear()
    p.write_text("stack_id,path,condition,infection_onset_hour\na,a.tif,infected,\nc,c.tif,mock,\n")
    with caplog.at_level(logging.WARNING):
        load_manifest(p, default_onset=0.0)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_missing_manifest(tmp_path):
    with pytest.raises(BadInputError, match="manifest not found"):
        load_manifest(tmp_path / "nope.csv")


def test_records_from_dirs(tmp_path):
    for d, names in (("inf", ["x1", "x2"]), ("mock", ["m1"])):
        (tmp_path / d).mkdir()
        for n in names:
            (tmp_path / d / f"{n}.tif").write_bytes(b"")
    recs = records_from_dirs(tmp_path / "inf", tmp_path / "mock", default_interval=0.25, default_onset=1.0)
    assert [(r.stack_id, r.infected, r.onset_hour) for r in recs] == [
        ("x1", True, 1.0),
        ("x2", True, 1.0),
        ("m1", False, None),
    ]
    assert all(r.frame_interval_hours == 0.25 for r in recs)
    with pytest.raises(BadInputError, match="data folder not found"):
        records_from_dirs(tmp_path / "nope", tmp_path / "mock")


def recs(n_groups: int, per_group: int = 2) -> list[StackRecord]:
    out = []
    for g in range(n_groups):
        for k in range(per_group):
            infected = k % 2 == 0
            out.append(StackRecord(f"g{g}s{k}", "x", infected, 0.0 if infected else None, 1.0, 0.0, None, f"g{g}"))
    return out


@pytest.mark.parametrize("seed", range(10))
def test_auto_split_is_grouped_stratified_and_seeded(seed):
    records = recs(8)
    splits = auto_split(records, val_fraction=0.25, test_fraction=0.25, seed=seed)
    assert splits == auto_split(records, val_fraction=0.25, test_fraction=0.25, seed=seed)
    by_group: dict[str, set[str]] = {}
    for r in records:
        by_group.setdefault(r.group, set()).add(splits[r.stack_id])
    assert all(len(s) == 1 for s in by_group.values())
    for split in ("train", "val", "test"):
        classes = {r.infected for r in records if splits[r.stack_id] == split}
        assert classes == {True, False}
    assert sum(v == "val" for v in splits.values()) == 4


def test_auto_split_differs_between_seeds():
    records = recs(8)
    results = {
        tuple(sorted(auto_split(records, val_fraction=0.25, test_fraction=0.0, seed=s).items())) for s in range(6)
    }
    assert len(results) > 1


def test_split_precedence_config_then_column():
    records = recs(3)
    splits = assign_splits(records, val_stacks=["g0s0", "g0s1"])
    assert splits["g0s0"] == "val" and splits["g1s0"] == "train"
    with pytest.raises(BadInputError, match="unknown stack_id 'zzz'"):
        assign_splits(records, val_stacks=["zzz"])


def test_empty_or_one_class_split_fails():
    records = recs(3)
    with pytest.raises(BadInputError, match="val split holds only infected"):
        assign_splits(records, val_stacks=["g0s0"])
    with pytest.raises(BadInputError, match="split is empty"):
        assign_splits(recs(1, per_group=4), val_fraction=0.25)
    # regression-only runs may validate on one class
    assert assign_splits(records, val_stacks=["g0s0"], need_both_classes=False)["g0s0"] == "val"
