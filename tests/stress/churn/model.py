"""The shadow record the stress test checks the daemon against.

Every request the clients make gets two ticks of one logical clock: when it was sent and when
its answer came back. The daemon handled it somewhere in between, so of two requests, the one
answered before the other was sent happened first; otherwise they overlapped and either
order is possible. From that the record knows, per image and in 4 KiB units:

* per dirty bitmap, the units it **must** hold (written after its last clear finished) and
  the units it **may** hold (written after its last clear began, or by a request whose fate
  is unknown). A bitmap is exact when ``must <= actual <= may`` rounded to its granularity;
* per unit, the writes in order (each client writes only its own units of a shared image and
  one request at a time, so the order is total), which gives the values a point-in-time
  copy or a crash may legitimately show.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field
from pathlib import Path

from bitarray import bitarray
from bitarray.util import intervals, zeros

UNIT = 4096


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        self.now += 1
        return self.now


def unit_data(value: int, count: int) -> bytes:
    """The bytes of *count* units written by write *value*: its id in every 8 bytes, so a
    unit read back names the write it came from (0: zeroes)."""
    return struct.pack("<Q", value) * (UNIT // 8 * count)


def decode_unit(data: bytes | bytearray | memoryview) -> int | None:
    """The write a unit came from, None when the unit is torn (mixes two writes)."""
    head = bytes(data[:8])
    if bytes(data) != head * (UNIT // 8):
        return None
    return int(struct.unpack("<Q", head)[0])


@dataclass(eq=False)
class Write:
    """One data request on an image. ``value``: the write id, 0 for zeroes, None for a
    discard (its result may be the old data or zeroes)."""

    value: int | None
    start: int  # first unit
    count: int
    sent: int
    acked: int | None = None
    ok: bool | None = None
    #: Whether it sets dirty bits for certain (a discard may not reach the format layer).
    dirties: bool = True
    #: Sent with FUA: stable once answered.
    fua: bool = False


def span(size_units: int, start: int, count: int) -> bitarray:
    out = zeros(size_units)
    out[start : start + count] = 1
    return out


def round_out(bits: bitarray, granularity: int) -> bitarray:
    """*bits* with every granule that holds one of them filled."""
    per = max(1, granularity // UNIT)
    if per == 1:
        return bits.copy()
    out = zeros(len(bits))
    for value, a, b in intervals(bits):
        if value:
            out[a // per * per : min(len(bits), -(-b // per) * per)] = 1
    return out


@dataclass(eq=False)
class BitmapModel:
    name: str
    granularity: int
    persistent: bool
    must: bitarray
    may: bitarray
    #: The clear (or creation) that started the current contents: sent and answered ticks.
    since_sent: int
    since_acked: int
    #: Frozen by a backup or held by an export: no client may touch it meanwhile.
    busy: bool = False
    #: While a backup that may clear it (bitmap-mode on-success or always) holds it: the
    #: sent and answered ticks of the backup command (answered None while it is out).
    cleared_by_job: tuple[int, int | None] | None = None
    #: What happened to it, for the report when it does not match.
    history: list[str] = field(default_factory=list)

    def granules(self, bits: bitarray) -> int:
        return round_out(bits, self.granularity).count() // max(1, self.granularity // UNIT)


@dataclass(eq=False)
class ImageModel:
    path: Path
    size: int
    cluster: int = 65536
    #: Every write in the order its answer came (so sorted by ``acked``), failures included.
    answered: list[Write] = field(default_factory=list)
    inflight: set[Write] = field(default_factory=set)
    #: Per unit, the writes that touched it, in order.
    history: list[list[Write]] = field(default_factory=list)
    bitmaps: dict[str, BitmapModel] = field(default_factory=dict)
    #: Persistent bitmaps whose removal was answered: no image may show them consistent.
    removed: set[str] = field(default_factory=set)
    #: Writes answered before this tick are on stable storage (a flush sent after them
    #: was answered, or the node was closed).
    durable_before: int = 0

    def __post_init__(self) -> None:
        self.history = [[] for _ in range(self.units)]

    @property
    def units(self) -> int:
        return self.size // UNIT

    # -- writes --------------------------------------------------------------------------
    def begin(self, w: Write) -> None:
        self.inflight.add(w)
        for u in range(w.start, w.start + w.count):
            self.history[u].append(w)

    def end(self, w: Write, acked: int, ok: bool) -> None:
        """The answer came: every bitmap that existed learns about it."""
        w.acked, w.ok = acked, ok
        self.inflight.discard(w)
        self.answered.append(w)
        bits = span(self.units, w.start, w.count)
        for bm in self.bitmaps.values():
            if ok and w.dirties and bm.since_acked < w.sent:
                bm.must |= bits
            if bm.since_sent < acked:
                bm.may |= bits

    def inflight_bits(self) -> bitarray:
        out = zeros(self.units)
        for w in self.inflight:
            out[w.start : w.start + w.count] = 1
        return out

    def since(self, sent: int, acked: int) -> tuple[bitarray, bitarray]:
        """(must, may) of a bitmap cleared by a request sent at *sent*, answered at *acked*,
        from the writes answered so far (later ones are added as their answers come)."""
        must, may = zeros(self.units), zeros(self.units)
        i = bisect.bisect_right([w.acked or 0 for w in self.answered], sent)
        for w in self.answered[i:]:
            may[w.start : w.start + w.count] = 1
            if w.ok and w.dirties and w.sent > acked:
                must[w.start : w.start + w.count] = 1
        return must, may

    # -- bitmaps -------------------------------------------------------------------------
    def add_bitmap(
        self, name: str, granularity: int, persistent: bool, sent: int, acked: int
    ) -> BitmapModel:
        must, may = self.since(sent, acked)
        bm = BitmapModel(name, granularity, persistent, must, may, sent, acked)
        bm.history.append(f"added at {sent}-{acked} (granularity {granularity})")
        self.bitmaps[name] = bm
        self.removed.discard(name)
        return bm

    def clear_bitmap(
        self, bm: BitmapModel, sent: int, acked: int, keep_may_at: int | None = None
    ) -> None:
        """*bm* holds what was written since a clear at (*sent*, *acked*); with *keep_may_at*,
        plus maybe what it held before, rounded out to that many bytes (a failed backup in
        mode ``always`` puts back what it did not copy, in whole copy clusters)."""
        must, may = self.since(sent, acked)
        bm.must = must
        bm.may = may if keep_may_at is None else may | round_out(bm.may, keep_may_at)
        bm.since_sent, bm.since_acked = sent, acked
        bm.history.append(f"cleared as of {sent}-{acked}, kept {keep_may_at}")

    def drop_bitmap(self, name: str) -> None:
        bm = self.bitmaps.pop(name)
        if bm.persistent:
            self.removed.add(name)

    def close(self, sent: int) -> None:
        """The node was deleted (by a request sent at *sent*): its non-persistent bitmaps
        are gone, what was written before is stable."""
        for name in [n for n, bm in self.bitmaps.items() if not bm.persistent]:
            del self.bitmaps[name]
        self.flushed(sent)

    def flushed(self, sent: int) -> None:
        """A flush sent at *sent* was answered."""
        self.durable_before = max(self.durable_before, sent)

    # -- data ----------------------------------------------------------------------------
    def candidates(self, unit: int, sent: int, acked: int) -> set[int | None]:
        """Values a copy of *unit* taken between ticks *sent* and *acked* may show (None in
        the set: anything). Writes that failed count as maybe done."""
        hist = self.history[unit]
        base = -1
        for i, w in enumerate(hist):
            if w.acked is not None and w.acked < sent and w.ok:
                base = i
        out: set[int | None] = set()
        if base < 0:
            out.add(0)
        else:
            out.add(hist[base].value)
        for w in hist[base + 1 :]:
            if w.sent < acked:
                out.add(w.value)
        if None in out:  # a discard: the old data or zeroes
            out.add(0)
        return out

    def crash_candidates(self, unit: int) -> set[int | None]:
        """Values *unit* may show after a crash: from the last write known to be stable on,
        anything written later (answered or not)."""
        hist = self.history[unit]
        base = -1
        for i, w in enumerate(hist):
            if w.acked is not None and w.ok and (w.fua or w.acked < self.durable_before):
                base = i
        out: set[int | None] = {0} if base < 0 else set()
        out.update(w.value for w in hist[max(base, 0) :])
        if None in out:
            out.add(0)
        return out
