"""Benchmarks (not tests): `python -m experiments.benchmark env|policy|train|sac|drq|fuse|fuse-drq|features|estimator|latents|multitask|precision|streaming|gpu|all [--quick]`.

The tables live in `experiments.benchmarks`; this module is the command.
"""

import sys

from experiments.benchmarks.cli import main
from experiments.runtime import keep_freed_memory

if __name__ == "__main__":
    keep_freed_memory()  # the commands tune the allocator, importing the package does not
    sys.exit(main())
