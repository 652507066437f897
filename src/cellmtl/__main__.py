"""`python -m cellmtl` (also what `torchrun -m cellmtl` runs)."""

import sys

from cellmtl.cli import main

if __name__ == "__main__":
    sys.exit(main())
