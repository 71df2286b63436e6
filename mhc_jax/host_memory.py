"""Host memory: the pages a CPU step frees stay mapped for the next step.

XLA:CPU allocates a step's temporaries (gigabytes from `10m` up) with malloc. glibc serves blocks
that large with a fresh mmap and unmaps them when they are freed, so every step faults in every
page it touches again: about 800,000 faults per mHC step at `10m` (seq_len 256, batch 8) on a
2-core VM, where they took 4-7 s of kernel time beside 10 s of compute, and more for the variant
with more temporaries. Served from one heap that is never trimmed, the same blocks are reused
without a fault. Accelerators allocate their own memory; there this only touches host buffers.
"""

import ctypes
import ctypes.util

# mallopt's parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def reuse_freed_pages() -> bool:
    """One heap for every thread (M_ARENA_MAX 1: a thread's own arena maps large blocks anyway), no
    mmap for large blocks, never trimmed. Call before JAX starts its threads; True where it applied
    (glibc), False elsewhere."""
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in
               ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))  # -1: the largest size_t
