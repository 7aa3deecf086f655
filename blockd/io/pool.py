"""The I/O thread pool (QEMU's thread-pool.c for ``aio=threads``).

File I/O releases the GIL inside ``os.preadv``/``os.pwritev``, so a pool of threads keeps the
event loop free while the kernel works. One hop per request: callers bundle a whole request into
one blocking function instead of awaiting several small ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

_WORKERS = max(8, (os.cpu_count() or 2) * 4)
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(_WORKERS, thread_name_prefix="blockd-io")
    return _pool


async def run_blocking(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run *fn* in the I/O pool. **Runs in:** an I/O thread; the caller awaits on the loop."""
    loop = asyncio.get_running_loop()
    call = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)
    return await loop.run_in_executor(_executor(), call)


def shutdown() -> None:
    """Stop the pool at daemon exit (waits for the requests already running)."""
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None
