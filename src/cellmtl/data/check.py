"""`cellmtl check-data`: read every stack of a config and report what training would see."""

from __future__ import annotations

from cellmtl.config import Config
from cellmtl.data.dataset import load_experiment, stack_index
from cellmtl.errors import BadInputError
from cellmtl.io import check_finite_stack

COLUMNS = ("stack_id", "condition", "onset_h", "format", "T", "C", "Y", "X", "dtype", "hours", "split", "frames_kept")


def _table(rows: list[dict[str, str]]) -> str:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def check_data(cfg: Config) -> str:
    """Probe and fully read every stack (integrity, NaN/Inf), then tabulate shapes, time ranges and the
    frames each split keeps. Raises BadInputError on the first problem, naming the stack."""
    exp = load_experiment(cfg)
    rows = []
    frames = {"train": 0, "val": 0, "test": 0}
    stacks = {(sp, c): 0 for sp in frames for c in ("infected", "uninfected")}
    for i, (rec, info) in enumerate(zip(exp.records, exp.infos, strict=False)):
        try:
            check_finite_stack(info)
        except BadInputError as exc:
            raise BadInputError(f"stack_id {rec.stack_id}: {exc}") from None
        split = exp.splits.get(rec.stack_id, "-")
        first = rec.start_hour
        last = rec.start_hour + (info.n_frames - 1) * rec.frame_interval_hours
        kept = 0
        if split in frames:
            kept = len(stack_index(rec, info, i, getattr(cfg.data.frames, split), cfg.data.pre_onset))
            frames[split] += kept
            stacks[(split, rec.condition)] += 1
        rows.append(
            {
                "stack_id": rec.stack_id,
                "condition": rec.condition,
                "onset_h": "-" if rec.onset_hour is None else f"{rec.onset_hour:g}",
                "format": info.format,
                "T": str(info.n_frames),
                "C": str(info.n_channels),
                "Y": str(info.height),
                "X": str(info.width),
                "dtype": info.dtype,
                "hours": f"{first:g}-{last:g}",
                "split": split,
                "frames_kept": str(kept),
            }
        )
    summary = [
        "",
        f"{len(exp.records)} stacks, channels used {exp.channels}"
        + (f" ({', '.join(exp.channel_names)}, matched by name)" if exp.channel_names else "")
        + f", pre_onset={cfg.data.pre_onset}",
    ]
    for sp in frames:
        summary.append(
            f"{sp:5s}: {stacks[(sp, 'infected')]} infected + {stacks[(sp, 'uninfected')]} uninfected stacks, "
            f"{frames[sp]} frames"
        )
    summary.append("no problems found")
    return _table(rows) + "\n" + "\n".join(summary)
