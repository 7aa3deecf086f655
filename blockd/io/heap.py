"""Keeping the process's memory close to what it uses.

glibc keeps freed heap memory for reuse, and after the first large buffer is freed it serves
buffers up to 32 MiB from the heap instead of from their own mappings. Request buffers are
allocated by the I/O threads, and by default each thread gets its own arena, so after a burst
of large requests the process keeps far more than it uses: a memory budget would bound what
is in use, not the RSS. Two measures: one arena for the whole process (Python threads
allocate under the GIL, so more arenas buy little and each keeps its own free memory), and a
trim after a burst. (Forcing large buffers into their own mappings instead costs page faults
on every request: it cut NBD write throughput to a third.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

from blockd.io.pool import run_blocking

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
_malloc_trim = getattr(_libc, "malloc_trim", None)

_M_ARENA_MAX = -8


def one_arena() -> None:
    """Serve every thread from one malloc arena; call before threads start."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_ARENA_MAX, 1)


#: Trim at most this often (it walks the heap).
MIN_INTERVAL = 1.0
_last = 0.0


async def trim() -> None:
    """Return free heap memory to the system (in the I/O pool; at most once a second)."""
    global _last
    now = time.monotonic()
    if _malloc_trim is None or now - _last < MIN_INTERVAL:
        return
    _last = now
    await run_blocking(_malloc_trim, 0)
