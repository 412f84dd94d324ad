"""`python -m sparsefeat ...` and `torchrun --nproc-per-node N -m sparsefeat ...`: the command line.

Under torchrun, `harvest` and `sweep` divide their work among the processes (distributed.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
