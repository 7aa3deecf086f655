"""Job speed limiting in time slices (QEMU's util/ratelimit.h).

A job asks how long to wait before moving *n* more bytes; within a 100 ms slice it may move
``speed / 10`` bytes, after which it sleeps to the end of the slice. Speed 0 means unlimited.
"""

from __future__ import annotations

import time

SLICE_NS = 100_000_000


class RateLimit:
    def __init__(self, speed: int = 0) -> None:
        self.speed = speed
        self._slice_start = 0
        self._slice_quota = 0
        self._dispatched = 0

    def set_speed(self, speed: int) -> None:
        self.speed = speed
        self._slice_quota = speed * SLICE_NS // 1_000_000_000
        self._slice_start = 0

    def delay_ns(self, nbytes: int) -> int:
        """Account *nbytes* and return how long to sleep first (0: go on)."""
        if self.speed <= 0:
            return 0
        if not self._slice_quota:
            self._slice_quota = max(1, self.speed * SLICE_NS // 1_000_000_000)
        now = time.monotonic_ns()
        if now - self._slice_start >= SLICE_NS:
            self._slice_start = now
            self._dispatched = 0
        if self._dispatched == 0 or self._dispatched + nbytes <= self._slice_quota:
            self._dispatched += nbytes
            return 0
        # Over quota: wait for enough whole slices to pay for what was dispatched.
        slices = (self._dispatched + nbytes) // self._slice_quota
        wait = self._slice_start + slices * SLICE_NS - now
        self._slice_start += slices * SLICE_NS
        self._dispatched = nbytes
        return max(0, wait)
