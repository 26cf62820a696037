"""Benchmarks (not tests): `python -m experiments.benchmark env|policy|train|sac|drq|fuse|fuse-drq|features|estimator|latents|multitask|precision|streaming|gpu|all [--quick]`.

The tables live in `experiments.benchmarks`; this module is the command.
"""

import sys

from experiments.benchmarks.cli import main
from experiments.runtime import prepare_process

if __name__ == "__main__":
    prepare_process()  # the commands tune their process, importing the package does not
    sys.exit(main())
