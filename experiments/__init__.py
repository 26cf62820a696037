"""Entry points: train, evaluate, benchmark, plot, sweep, distill, export (``python -m experiments.<command>``).

Importing the package changes nothing in the process; each command tunes it when it runs
(`experiments.runtime.prepare_process`: the allocator, and torch's dynamo import deferred).
"""
