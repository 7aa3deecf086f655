"""Job speed limiting in time slices (QEMU's util/ratelimit.h).

Within a 100 ms slice a job may move ``speed / 10`` bytes. Every request is added to the bytes
of the current slice; once they reach the quota, the slice is stretched to as many slice
lengths as those bytes are worth, and the caller sleeps until it ends. A slice that is over
starts afresh. So the average stays at ``speed`` whatever the request sizes are, also when one
request is bigger than a slice's quota, and bytes accounted without sleeping (copy-before-write)
delay whoever asks next. Speed 0 means unlimited.
"""

from __future__ import annotations

import time

SLICE_NS = 100_000_000


class RateLimit:
    def __init__(self, speed: int = 0) -> None:
        self.speed = 0
        self._slice_quota = 0
        self._slice_start = 0
        self._slice_end = 0
        self._dispatched = 0
        self.set_speed(speed)

    def set_speed(self, speed: int) -> None:
        """A new speed applies from the next request: a slice stretched under the old speed is
        measured again with the new quota then."""
        self.speed = speed
        self._slice_quota = max(1, speed * SLICE_NS // 1_000_000_000) if speed > 0 else 0

    def delay_ns(self, nbytes: int) -> int:
        """Account *nbytes*; return how long to sleep before going on (0: go on now)."""
        if self.speed <= 0:
            return 0
        now = time.monotonic_ns()
        if now > self._slice_end:
            self._slice_start = now
            self._slice_end = now + SLICE_NS
            self._dispatched = 0
        self._dispatched += nbytes
        if self._dispatched < self._slice_quota:
            return 0
        self._slice_end = self._slice_start + self._dispatched * SLICE_NS // self._slice_quota
        return max(0, self._slice_end - now)
