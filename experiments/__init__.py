"""Entry points: train, evaluate, benchmark, plot, sweep, distill, export (``python -m experiments.<command>``).

Importing the package changes nothing in the process; each command tunes the allocator when it runs
(`experiments.runtime.keep_freed_memory`).
"""
