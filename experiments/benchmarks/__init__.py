"""The benchmarks behind `python -m experiments.benchmark` (scripts, not tests): each table compares alternatives
measured side by side in one process and reports ratios, printed with the machine they ran on.

- `cli`: the command; `common`: machine header, tables, timers;
- `environment`, `policy`, `training`: env steps/s, the encoder against NatureCNN, PPO throughput and replay memory;
- `attention`, `precision`, `streaming`, `sac`, `gpu`: the attention kernels, bf16, streaming inference, SAC
  updates (both recipes) and the tables only a CUDA device can produce.
"""
