"""Large host allocations reused from step to step rather than mapped anew (CPU training on glibc).

glibc serves every allocation above its mmap threshold with a fresh ``mmap`` and unmaps it on free, so the
vocabulary-sized temporaries of a CPU training step are page-faulted in again every step. Raising the threshold
(and the trim threshold with it) keeps such blocks on the heap, where the next step reuses them, at the cost of up
to ``TRIM_THRESHOLD`` of freed memory kept mapped per process. Measurements: docs/benchmarks.md, "Host allocator".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 512 << 20

_applied: bool | None = None


def reuse_large_host_allocations() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where the C library is not glibc.

    Hand-written: jemalloc and tcmalloc reuse large blocks too, but only when preloaded before the interpreter
    starts (``LD_PRELOAD``), which a library called from a user's own script cannot arrange.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError) as exc:  # a static or unusual C library: stay with its defaults
        log.debug("mallopt unavailable: %s", exc)
    return _applied
