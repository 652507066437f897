"""The run folder: its unique name, the run's logger (train.log and stderr), the files written at the start
(config.yaml, splits.csv), metrics.csv."""


from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from cellmtl.config import Config
from cellmtl.fileio import write_csv


def new_run_dir(cfg: Config) -> Path:
    """`{output_dir}/{experiment_name}/{run_id}`, run_id sortable by time and unique."""
    parent = Path(cfg.output_dir) / cfg.experiment_name
    parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        run_dir = parent / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            time.sleep(0.001)
    raise RuntimeError(f"could not create a unique run folder in {parent}")


def make_logger(run_dir: Path, main: bool = True) -> logging.Logger:
    """A logger of this run only: train.log (appended on resume) and stderr. Under DDP only rank 0
    (`main`) logs; the other ranks' loggers print errors only."""
    logger = logging.getLogger(f"cellmtl.run.{run_dir.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
    if not main:
        logger.setLevel(logging.ERROR)
        logger.addHandler(logging.StreamHandler(sys.stderr))
        return logger
    fh = logging.FileHandler(run_dir / "train.log", mode="a", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(fh)
    logger.addHandler(sh)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)


def write_metrics_csv(history: list[dict[str, Any]], path: Path) -> None:
    rows = [{k: ("" if v is None else v) for k, v in h.items()} for h in history]
    write_csv(rows, path)


def rss_mib() -> float | None:
    """Resident memory of this process now (MiB; Linux), logged per epoch to show memory stays flat."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


