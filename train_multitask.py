#!/usr/bin/env python
"""Multi-task training from the repository root: a thin wrapper of `cellmtl train`.

    python train_multitask.py --config configs/multitask_example.yaml [--set key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from cellmtl.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:], "--set", "task.mode=multitask"]))
