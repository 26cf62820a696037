"""Entry points: train, evaluate, benchmark, plot, sweep, distill, export (``python -m experiments.<command>``)."""

from experiments.runtime import keep_freed_memory

# Large tensors re-allocated every forward were page-faulted in each time (see experiments/runtime.py).
ALLOCATOR_TUNED = keep_freed_memory()
