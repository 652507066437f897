#!/usr/bin/env python
"""Training from the repository root with `task.mode` taken from the config (classification,
regression or multitask): a thin wrapper of `cellmtl train`.

    python train.py --config configs/multitask_example.yaml --set task.mode=classification
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from cellmtl.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
