"""Guest-to-host mapping: the L1 table, L2 tables through the cache, L2 entry types and L1
growth (QEMU's block/qcow2-cluster.c, the lookup and table half; the request logic that uses
it is in driver.py).

The L1 table is small enough to keep in memory whole (QEMU's limit is 32 MiB); it is the
authority while the image is open, and the entries changed since the last flush are written
after the L2 tables they point to are on disk.
"""

from __future__ import annotations

import contextlib
import errno
import struct
from collections.abc import Callable
from typing import Protocol

from blockd.block.drivers.metacache import MetadataCache
from blockd.block.drivers.qcow2.header import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    MAX_L1_BYTES,
    OFF_L1,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
)
from blockd.block.drivers.qcow2.refcount import RefcountIO, RefcountManager

UNALLOCATED = 0
NORMAL = 1
COMPRESSED = 2
ZERO_PLAIN = 3
ZERO_ALLOC = 4

_Q = struct.Struct(">Q")
_ZERO_RUN = 65536
_ZEROES = bytes(_ZERO_RUN)


def cluster_type(entry: int) -> int:
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED
    if entry & OFLAG_ZERO:
        return ZERO_ALLOC if entry & L2E_OFFSET_MASK else ZERO_PLAIN
    if entry & L2E_OFFSET_MASK:
        return NORMAL
    return UNALLOCATED


def writable_in_place(entry: int) -> bool:
    """A cluster a write may overwrite where it is: allocated data that only this L2 entry
    references (the COPIED flag, i.e. refcount 1)."""
    return (entry & (OFLAG_COMPRESSED | OFLAG_ZERO | OFLAG_COPIED)) == OFLAG_COPIED and bool(
        entry & L2E_OFFSET_MASK
    )


class ClusterIO(RefcountIO, Protocol):
    pass


class ClusterMap:
    def __init__(
        self,
        io: ClusterIO,
        cluster_bits: int,
        l1_size: int,
        l1_offset: int,
        refcounts: RefcountManager,
        l2_cache_entries: int,
        queue_free: Callable[[int, int], None],
    ) -> None:
        self.io = io
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.l2_bits = cluster_bits - 3
        self.l2_entries = 1 << self.l2_bits
        self.l1_size = l1_size
        self.l1_offset = l1_offset
        self.l1 = bytearray()
        self.l1_dirty: set[int] = set()
        self.refcounts = refcounts
        self.queue_free = queue_free
        self.cache = MetadataCache(
            io, self.cluster_size, l2_cache_entries, before_writeback=self._before_writeback
        )
        #: Host clusters holding L2 tables (for overlap checks).
        self.l2_clusters: set[int] = set()

    async def load(self) -> None:
        if self.l1_size:
            self.l1 = bytearray(await self.io.read_meta(self.l1_offset, self.l1_size * 8))
        # Skip trailing empty entries 64 KiB at a time: a hostile l1_size of 4M entries past
        # the end of a small file must not cost a 4M-entry scan at open.
        used = len(self.l1)
        while used >= _ZERO_RUN and self.l1[used - _ZERO_RUN : used] == _ZEROES:
            used -= _ZERO_RUN
        self.l2_clusters = {
            (e & L1E_OFFSET_MASK) >> self.cluster_bits
            for e in struct.unpack_from(f">{used // 8}Q", self.l1)
            if e & L1E_OFFSET_MASK
        }

    @property
    def l1_clusters(self) -> range:
        """Host clusters of the active L1 table."""
        first = self.l1_offset >> self.cluster_bits
        return range(first, first + -(-self.l1_size * 8 // self.cluster_size))

    async def _before_writeback(self) -> None:
        # L2 entries may point to clusters whose refcounts are still only in memory.
        if self.refcounts.cache.dirty:
            await self.refcounts.flush()
            await self.io.sync()

    # -- lookups -----------------------------------------------------------------------------
    def l1_entry(self, index: int) -> int:
        if index >= self.l1_size:
            return 0
        return int(_Q.unpack_from(self.l1, index * 8)[0])

    def l2_offset(self, index: int) -> int:
        entry = self.l1_entry(index)
        off = entry & L1E_OFFSET_MASK
        if off & (self.cluster_size - 1):
            raise OSError(errno.EIO, f"qcow2: L2 table offset {off:#x} unaligned (L1 {index})")
        return off

    async def entries(self, cluster: int, count: int) -> tuple[int, ...]:
        """L2 entries of guest clusters [cluster, cluster+count), all in one L2 table."""
        l1i = cluster >> self.l2_bits
        if l1i >= self.l1_size:
            raise OSError(errno.EIO, "qcow2: guest offset beyond the L1 table")
        off = self.l2_offset(l1i)
        if not off:
            return (0,) * count
        table = await self.cache.get(off)
        idx = cluster & (self.l2_entries - 1)
        return struct.unpack_from(f">{count}Q", table, idx * 8)

    async def entries_span(self, cluster: int, count: int) -> list[int]:
        """Like :meth:`entries`, across as many L2 tables as the range touches."""
        out: list[int] = []
        c = cluster
        end = cluster + count
        while c < end:
            stop = min(end, ((c >> self.l2_bits) + 1) << self.l2_bits)
            out.extend(await self.entries(c, stop - c))
            c = stop
        return out

    # -- updates -----------------------------------------------------------------------------
    async def writable_table(self, l1i: int) -> int:
        """The host offset of the L2 table for L1 index *l1i*, allocating it, or copying a
        shared one, so that it may be changed."""
        entry = self.l1_entry(l1i)
        old = entry & L1E_OFFSET_MASK
        if old and entry & OFLAG_COPIED:
            if old & (self.cluster_size - 1):
                raise OSError(errno.EIO, f"qcow2: L2 table offset {old:#x} unaligned")
            return old
        if l1i >= self.l1_size:
            raise OSError(errno.EIO, "qcow2: guest offset beyond the L1 table")
        if old and old & (self.cluster_size - 1):
            raise OSError(errno.EIO, f"qcow2: L2 table offset {old:#x} unaligned")
        data = bytearray(await self.cache.get(old)) if old else bytearray(self.cluster_size)
        new = await self.refcounts.alloc(1)
        # Write the table to its cluster at once, while nothing refers to it (as QEMU's
        # l2_allocate does): the file takes the space now, so a full disk fails this
        # allocation, which is undone, instead of the write-back at the next flush, which
        # would leave the cluster counted but never referenced. The cached copy stays dirty
        # so that the write-back still orders refcounts before L2 before L1.
        try:
            await self.io.write_meta(new, data)
        except BaseException:
            with contextlib.suppress(OSError):
                await self.refcounts.update(new >> self.cluster_bits, 1, -1)
            raise
        await self.cache.install(new, data, dirty=True)
        _Q.pack_into(self.l1, l1i * 8, new | OFLAG_COPIED)
        self.l1_dirty.add(l1i)
        self.l2_clusters.add(new >> self.cluster_bits)
        if old:
            self.l2_clusters.discard(old >> self.cluster_bits)
            self.queue_free(old, self.cluster_size)
        return new

    async def set_entries(self, cluster: int, values: list[int]) -> None:
        """Store L2 entries for [cluster, cluster+len(values)); the table must be writable."""
        l1i = cluster >> self.l2_bits
        off = await self.writable_table(l1i)
        table = await self.cache.get(off)
        idx = cluster & (self.l2_entries - 1)
        struct.pack_into(f">{len(values)}Q", table, idx * 8, *values)
        self.cache.mark_dirty(off, table)

    async def set_entries_span(self, cluster: int, values: list[int]) -> None:
        c = cluster
        i = 0
        while i < len(values):
            stop = min(len(values), i + (((c >> self.l2_bits) + 1) << self.l2_bits) - c)
            await self.set_entries(c, values[i:stop])
            c += stop - i
            i = stop

    async def flush_l1(self) -> None:
        if not self.l1_dirty:
            return
        lo = min(self.l1_dirty)
        hi = max(self.l1_dirty) + 1
        await self.io.write_meta(self.l1_offset + lo * 8, bytes(self.l1[lo * 8 : hi * 8]))
        self.l1_dirty.clear()

    async def drop_tables(self, first: int, free_entry: Callable[[int], None]) -> None:
        """A shrink: forget the L2 tables of L1 indexes *first* and up. What their entries
        point to goes to *free_entry*, the L1 entries become zero, and the tables' own
        clusters are queued for release, which happens once the zeroed L1 is stable."""
        for l1i in range(first, self.l1_size):
            off = self.l2_offset(l1i)
            if not off:
                continue
            for entry in await self.entries(l1i << self.l2_bits, self.l2_entries):
                if entry:
                    free_entry(entry)
            _Q.pack_into(self.l1, l1i * 8, 0)
            self.l1_dirty.add(l1i)
            self.l2_clusters.discard(off >> self.cluster_bits)
            self.queue_free(off, self.cluster_size)

    async def grow_l1(self, min_size: int, exact: bool) -> None:
        """Move the L1 table to a bigger one (the caller has flushed every cache, so the
        in-memory table equals what the new one must hold)."""
        new_size = self.l1_size
        if exact:
            new_size = min_size
        else:
            while new_size < min_size:
                new_size = max(min_size if new_size == 0 else 0, -(-new_size * 3 // 2))
        if new_size > MAX_L1_BYTES // 8:
            raise OSError(errno.EFBIG, "File too large")
        nbytes = new_size * 8
        new_off = await self.refcounts.alloc(-(-nbytes // self.cluster_size))
        # The refcounts for the new table before the header points at it.
        await self.refcounts.flush()
        table = bytes(self.l1) + bytes(nbytes - len(self.l1))
        await self.io.write_meta(new_off, table)
        await self.io.sync()
        await self.io.write_header(OFF_L1, struct.pack(">IQ", new_size, new_off))
        await self.io.sync()
        old_clusters = self.l1_clusters if self.l1_size else range(0)
        self.l1 = bytearray(table)
        self.l1_size = new_size
        self.l1_offset = new_off
        self.l1_dirty.clear()
        if len(old_clusters):
            # The header no longer points at the old table: it can go at once.
            await self.refcounts.update(old_clusters.start, len(old_clusters), -1)
