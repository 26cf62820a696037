"""Shared pieces of the benchmark scripts: the machine header, markdown tables, timers."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from perceiver_policy.model import cpu_model_and_flags


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    model, flags = cpu_model_and_flags()
    return (
        f"{model} [{' '.join(flags) or 'no avx2/avx512/bf16/amx'}], {os.cpu_count()} cores, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, {gpu}"
    )


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")
    sys.stdout.flush()


def percentiles(times_s: list[float]) -> tuple[float, float]:
    ms = 1000 * np.asarray(times_s)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def synchronize(device: str) -> None:
    """Waits for the device's queued kernels (CUDA runs asynchronously); nothing to wait for on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 3, device: str = "cpu") -> list[float]:
    """Wall time per call, after `warmup` calls; on CUDA the device is synchronised after each call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times
