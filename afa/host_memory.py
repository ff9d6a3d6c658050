"""Keep freed CPU memory in the process for the next step instead of handing it back to the OS.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on ``free``; it also trims the top of its heap when enough of it is free.
A training step allocates and frees the same large tensors every iteration (a 2 x 256 x 120 x 120
decoder map is 59 MB), so each one comes back as new pages that the kernel must fault in and zero
on first touch: on a 2-core AMD EPYC this was 16 % of an AFA step at crop 320 and a third of the
demo's joint step (docs/BENCHMARKS.md, "Host memory"). After :func:`keep_freed_host_memory`, freed
blocks stay in the heap and are reused; resident memory stays near the peak, as a caching
allocator's does. The numbers computed are the same bit for bit: only where tensors live changes.

Only glibc (Linux) has these settings; elsewhere this does nothing. ``AFA_KEEP_HOST_MEMORY=0`` in
the environment leaves the C library's defaults (for comparisons, or a machine short of memory).
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["keep_freed_host_memory", "ENV_VAR"]

ENV_VAR = "AFA_KEEP_HOST_MEMORY"
# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_state: str | None = None  # what the first call did, for later calls and the logs


def keep_freed_host_memory() -> str:
    """Make glibc keep freed memory for reuse (``mallopt``: no mmapped blocks, trimming only
    above 2 GiB of free heap top); process-wide, for later allocations. Idempotent.

    Returns what happened, in words, for the run's log.
    """
    global _state
    if _state is not None:
        return _state
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        _state = f"the C library's own (set by {ENV_VAR}=0)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state = "the C library's own (not glibc)"
    else:
        libc = ctypes.CDLL(None)
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is None:
            _state = "the C library's own (no mallopt)"
        else:
            mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
            mallopt.restype = ctypes.c_int
            ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
            _state = ("freed memory kept for reuse (glibc mallopt: no mmap, no trim below 2 GiB)"
                      if ok else "the C library's own (mallopt refused)")
    return _state
