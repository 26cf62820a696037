"""Process settings for the entry points (`python -m experiments.<command>`), applied when a command runs
(`prepare_process`): glibc's allocator thresholds, and torch's dynamo import deferred until something compiles.

glibc serves every allocation above its mmap threshold (128 KiB, rising to at most 32 MiB as blocks are freed)
with a fresh `mmap` and returns it with `munmap` when freed, so each large tensor a forward or an update creates
— a batch of 256 pixel stacks cast to float is 65 MB — is page-faulted in again on every call. Raising the mmap
and trim thresholds keeps freed memory in the heap for the next call. Measured on a 2-core EPYC at batch 256 (84
px x 3 frames + proprio + history, one thread): the cast alone 76 -> 46 ms, the Perceiver extractor 303 -> 195 ms,
SB3's NatureCNN extractor 318 -> 200 ms; the cost is that the process keeps its peak heap instead of returning it.

Neither the library (`agents`, `envs`, `perceiver_policy`) nor importing `experiments` changes a process's
allocator; only these commands do, when run. Skipped when the user chose an allocator (``LD_PRELOAD``, e.g. jemalloc or tcmalloc) or glibc
thresholds (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), when ``PERCEIVER_RL_SYSTEM_MALLOC=1``, and
off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
USER_SETTINGS = (
    "LD_PRELOAD",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "PERCEIVER_RL_SYSTEM_MALLOC",
)


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Serve allocations below ``threshold`` bytes from the heap and never trim it; True if applied."""
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))


# Optimizer methods that torch wraps with `torch._disable_dynamo`, whose first call imports torch._dynamo.
DYNAMO_WRAPPED_OPTIMIZER_METHODS = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")
_DYNAMO_CACHE = "__dynamo_disable"  # where torch's wrapper caches the disabled function (torch/_compile.py)


def defer_dynamo_import() -> bool:
    """Keep `torch.optim.Optimizer`'s construction and state-dict methods from importing torch._dynamo.

    torch wraps them so that they are never compiled; the wrapper imports torch._dynamo on its first call to mark
    them so (measured 3.4-3.8 s of an 11 s `experiments.evaluate` on a tiny run, 2-core EPYC, torch 2.13.0): every
    command that loads an SB3 model builds its optimizers and loads their state, and `evaluate` and `export` never
    step them. Nothing can be compiling while torch._dynamo is not imported, so until it is these methods run
    unwrapped; from the first call after it is imported on, torch's own wrapper decides, as before. Optimizer.step
    imports torch._dynamo itself, so training is unchanged. False if this torch's wrappers are not the ones known.
    """
    import torch

    deferred = True
    for name in DYNAMO_WRAPPED_OPTIMIZER_METHODS:
        wrapper = getattr(torch.optim.Optimizer, name)
        method = getattr(wrapper, "__wrapped__", None)
        if method is None or getattr(method, _DYNAMO_CACHE, None) is not None:
            deferred = False  # not wrapped as expected, or already resolved by torch
            continue
        setattr(method, _DYNAMO_CACHE, _unwrapped_until_dynamo(method, wrapper))
    return deferred


def _unwrapped_until_dynamo(method, wrapper):
    def call(*args, **kwargs):
        if "torch._dynamo" in sys.modules:  # something may compile: hand the method back to torch's wrapper
            delattr(method, _DYNAMO_CACHE)
            return wrapper(*args, **kwargs)
        return method(*args, **kwargs)

    return call


def prepare_process() -> None:
    """What a command applies to its own process when it runs (importing the package applies nothing)."""
    keep_freed_memory()
    defer_dynamo_import()
