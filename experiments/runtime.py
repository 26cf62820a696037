"""Process settings for the entry points (`python -m experiments.<command>`), applied when a command runs.

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
