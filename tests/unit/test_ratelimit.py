"""The job speed limit on a fake clock: a caller that sleeps whatever it is told moves bytes at
the set speed on average, whether its requests are smaller or bigger than a slice's quota, and
bytes counted without sleeping (copy-before-write) delay the next caller."""

from __future__ import annotations

import pytest

from blockd.io import ratelimit
from blockd.io.ratelimit import SLICE_NS, RateLimit

MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.ns = 10**12

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(ratelimit.time, "monotonic_ns", c)
    return c


def _copy(rl: RateLimit, clock: Clock, total: int, chunk: int) -> float:
    """QEMU's block-copy order: wait for what is owed (looking again after the wait), count
    the request, send it. Returns the seconds the whole copy took on the fake clock."""
    start = clock.ns
    sent = 0
    while sent < total:
        while (d := rl.delay_ns(0)) > 0:
            clock.ns += d
        rl.delay_ns(chunk)
        sent += chunk
    return (clock.ns - start) / 1e9


@pytest.mark.parametrize(
    ("speed", "chunk"),
    [(4 * MiB, MiB), (21 * MiB, MiB), (100 * MiB, MiB), (MiB, 64 * 1024), (512 * 1024, MiB)],
)
def test_average_speed(clock: Clock, speed: int, chunk: int) -> None:
    total = 64 * chunk
    took = _copy(RateLimit(speed), clock, total, chunk)
    # the last request goes without a wait after it
    expect = (total - chunk) / speed
    assert expect * 0.95 <= took <= expect * 1.05 + SLICE_NS / 1e9, (took, expect)


def test_unthrottled_bytes_delay_the_next_request(clock: Clock) -> None:
    rl = RateLimit(10 * MiB)  # 1 MiB per slice
    assert rl.delay_ns(0) == 0
    rl.delay_ns(3 * MiB)  # counted by someone that does not wait
    assert rl.delay_ns(0) == 3 * SLICE_NS
    clock.ns += 3 * SLICE_NS
    assert rl.delay_ns(0) == 0


def test_speed_zero_and_changes(clock: Clock) -> None:
    rl = RateLimit(0)
    assert rl.delay_ns(10 * MiB) == 0
    rl.set_speed(MiB)  # 100 KiB per slice
    assert rl.delay_ns(MiB) == pytest.approx(10 * SLICE_NS, rel=1e-4)
    rl.set_speed(10 * MiB)  # the stretched slice is measured again with the new quota
    assert rl.delay_ns(0) == SLICE_NS
    rl.set_speed(0)
    assert rl.delay_ns(0) == 0
