"""Reference counts: the refcount table, refcount blocks of any width (1..64 bits), cluster
allocation and table growth (QEMU's block/qcow2-refcount.c, the allocation half).

Why allocations only ever *increase* refcounts here and frees are queued by the driver: a
refcount block may be written to disk at any time (cache eviction), and an increment that
reaches the disk early is only a leak, while a decrement that reaches it before the L2 entry
that dropped the cluster would be corruption. The driver applies queued decrements after the
L2 tables are on disk.

New refcount blocks describe themselves: a block for range *r* is placed on the first cluster
of range *r* (all free, since no block counted them), so creating one never needs another.
Growing the table puts the new table and the blocks covering it in a fresh area past every
range the old table describes, again self-describing, then switches the header to it.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import Protocol

from blockd.block.drivers.metacache import MetadataCache, MetadataIO
from blockd.block.drivers.qcow2.header import (
    MAX_HOST_OFFSET,
    MAX_REFTABLE_BYTES,
    OFF_REFTABLE,
    REFT_OFFSET_MASK,
)

_STRUCT_FMT = {3: "B", 4: "H", 5: "I", 6: "Q"}


class RefcountIO(MetadataIO, Protocol):
    async def sync(self) -> None: ...

    async def write_header(self, offset: int, data: bytes) -> None: ...


def _accessors(
    order: int,
) -> tuple[Callable[[bytearray, int], int], Callable[[bytearray, int, int], None]]:
    """get(block, index) and set(block, index, value) for one refcount width."""
    if order == 4:
        h = struct.Struct(">H")

        def get16(b: bytearray, i: int) -> int:
            return int(h.unpack_from(b, i << 1)[0])

        def set16(b: bytearray, i: int, v: int) -> None:
            h.pack_into(b, i << 1, v)

        return get16, set16
    if order >= 3:
        w = 1 << (order - 3)

        def getw(b: bytearray, i: int) -> int:
            return int.from_bytes(b[i * w : (i + 1) * w], "big")

        def setw(b: bytearray, i: int, v: int) -> None:
            b[i * w : (i + 1) * w] = v.to_bytes(w, "big")

        return getw, setw
    bits = 1 << order
    per = 8 >> order
    mask = (1 << bits) - 1

    # Sub-byte widths pack entries from the least significant bits of each byte up.
    def getb(b: bytearray, i: int) -> int:
        return (b[i // per] >> ((i % per) * bits)) & mask

    def setb(b: bytearray, i: int, v: int) -> None:
        shift = (i % per) * bits
        b[i // per] = (b[i // per] & ~(mask << shift) & 0xFF) | (v << shift)

    return getb, setb


class RefcountManager:
    def __init__(
        self,
        io: RefcountIO,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        cache_entries: int,
    ) -> None:
        self.io = io
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.order = refcount_order
        self.max_refcount = (1 << (1 << refcount_order)) - 1
        #: log2 of the entries in one refcount block.
        self.rb_shift = cluster_bits + 3 - refcount_order
        self.rb_entries = 1 << self.rb_shift
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.table: list[int] = []
        self.cache = MetadataCache(io, self.cluster_size, cache_entries)
        self._get, self._set = _accessors(refcount_order)
        #: Lowest cluster index that may be free (QEMU's free_cluster_index).
        self.free_hint = 0
        #: Where the next compressed cluster may go inside a partly used host cluster
        #: (QEMU's free_byte_offset); 0 when a fresh cluster must be taken.
        self.free_byte_offset = 0
        #: Every cluster holding refcount metadata, for the overlap checks.
        self.meta_clusters: set[int] = set()

    async def load(self) -> None:
        nbytes = self.table_clusters * self.cluster_size
        data = await self.io.read_meta(self.table_offset, nbytes)
        self.table = list(struct.unpack(f">{nbytes // 8}Q", data))
        first = self.table_offset >> self.cluster_bits
        self.meta_clusters = set(range(first, first + self.table_clusters))
        self.meta_clusters.update(
            (e & REFT_OFFSET_MASK) >> self.cluster_bits for e in self.table if e
        )

    # -- blocks ------------------------------------------------------------------------------
    def _block_offset(self, rbi: int) -> int:
        """Host offset of refcount block *rbi*, 0 when it does not exist."""
        if rbi >= len(self.table):
            return 0
        entry = self.table[rbi]
        off = entry & REFT_OFFSET_MASK
        if entry & 0x1FF or off & (self.cluster_size - 1):
            raise OSError(errno.EIO, f"qcow2: refcount block {rbi} offset {entry:#x} unaligned")
        return off

    async def _block(self, rbi: int) -> tuple[int, bytearray] | None:
        off = self._block_offset(rbi)
        if not off:
            return None
        return off, await self.cache.get(off)

    async def get(self, cluster: int) -> int:
        blk = await self._block(cluster >> self.rb_shift)
        if blk is None:
            return 0
        return self._get(blk[1], cluster & (self.rb_entries - 1))

    # -- updates -----------------------------------------------------------------------------
    async def update(self, first: int, count: int, delta: int) -> None:
        """Add *delta* to the refcounts of clusters [first, first+count).

        Each refcount block is checked before it is changed, so a refused update (overflow,
        a negative refcount on a corrupt image) leaves that block as it was.
        """
        c = first
        end = first + count
        while c < end:
            rbi = c >> self.rb_shift
            base = rbi << self.rb_shift
            stop = min(end, base + self.rb_entries)
            blk = await self._block(rbi)
            if blk is None:
                raise OSError(errno.EIO, f"qcow2: no refcount block for cluster {c}")
            off, buf = blk
            self._add(buf, c - base, stop - base, delta, base)
            self.cache.mark_dirty(off, buf)
            c = stop
        if delta < 0:
            self.free_hint = min(self.free_hint, first)
            fbo = self.free_byte_offset >> self.cluster_bits
            if self.free_byte_offset and first <= fbo < end:
                # The partly used cluster may become free and be handed out whole: never
                # pack compressed data into it again.
                self.free_byte_offset = 0

    def _add(self, buf: bytearray, a: int, b: int, delta: int, base: int) -> None:
        """Add *delta* to entries [a, b) of one block, all or nothing."""
        fmt = _STRUCT_FMT.get(self.order)
        if fmt is not None:
            w = 1 << (self.order - 3)
            vals = struct.unpack_from(f">{b - a}{fmt}", buf, a * w)
            new = [v + delta for v in vals]
        else:
            new = [self._get(buf, i) + delta for i in range(a, b)]
        if min(new) < 0 or max(new) > self.max_refcount:
            i = next(k for k, v in enumerate(new) if v < 0 or v > self.max_refcount)
            raise OSError(
                errno.ERANGE if new[i] > 0 else errno.EIO,
                f"qcow2: refcount of cluster {base + a + i} out of range",
            )
        if fmt is not None:
            struct.pack_into(f">{b - a}{fmt}", buf, a * w, *new)
        else:
            for k, v in enumerate(new):
                self._set(buf, a + k, v)

    # -- allocation --------------------------------------------------------------------------
    async def alloc(self, count: int) -> int:
        """Allocate *count* contiguous clusters (refcount 1); returns the host offset.

        When the run lies in ranges no refcount block describes yet, the run is searched
        *count + k* long and the *k* missing blocks go right after the data (QEMU places them
        past the run too): a block that had to sit at the start of its own range would split
        every range, and a run longer than one range could then never be found.
        """
        k = 0
        while True:
            start = await self._find_free_run(count + k)
            end = start + count + k
            if end << self.cluster_bits > MAX_HOST_OFFSET:
                raise OSError(errno.EFBIG, "qcow2: image file would exceed 2^56 bytes")
            first_rb = start >> self.rb_shift
            last_rb = (end - 1) >> self.rb_shift
            missing = [r for r in range(first_rb, last_rb + 1) if not self._block_offset(r)]
            if missing and missing[-1] >= len(self.table):
                await self._grow_table(missing[-1])
                continue
            if len(missing) <= k:
                break
            k = len(missing)
        if missing:
            await self._create_blocks(missing, start + count)
        await self.update(start, count, 1)
        if self.free_hint == start:
            self.free_hint = start + count + len(missing)
        return start << self.cluster_bits

    async def alloc_bytes(self, size: int) -> int:
        """Room for *size* bytes of compressed data (QEMU's qcow2_alloc_bytes); returns the
        byte offset. Compressed clusters are packed one after the other: the data goes on in
        the host cluster the previous one ended in, and may run on into the next cluster if
        that one is free, else it starts a fresh cluster. Every host cluster the bytes touch
        gets one more reference."""
        cb = self.cluster_bits
        cs = self.cluster_size
        assert 0 < size <= cs
        off = self.free_byte_offset
        if off and await self.get(off >> cb) >= self.max_refcount:
            off = 0
        if off and cs - (off & (cs - 1)) >= size:
            await self.update(off >> cb, 1, 1)
        else:
            new = await self.alloc(1)
            if off and -(-off // cs) * cs == new:
                await self.update(off >> cb, 1, 1)  # runs on from the current cluster
            else:
                off = new
        self.free_byte_offset = 0 if not (off + size) & (cs - 1) else off + size
        return off

    async def alloc_upto(self, count: int) -> tuple[int, int]:
        """Allocate up to *count* contiguous clusters at the first free place: (offset, n).

        Writes use this so a fragmented image fills its holes instead of scanning for a
        hole big enough; in the free area at the end (the common case of a growing image) it
        is one run of *count* clusters.
        """
        c = self.free_hint
        while True:
            rbi = c >> self.rb_shift
            base = rbi << self.rb_shift
            blk = await self._block(rbi)
            if blk is None:
                return await self.alloc(count), count
            buf = blk[1]
            z = self._find_zero(buf, c - base, self.rb_entries)
            if z >= self.rb_entries:
                c = base + self.rb_entries
                continue
            self.free_hint = base + z
            nz = self._find_nonzero(buf, z, min(self.rb_entries, z + count))
            if nz == self.rb_entries and nz - z < count and not self._block_offset(rbi + 1):
                # The hole runs on into the free area past the last block.
                return await self.alloc(count), count
            n = nz - z
            start = base + z
            if (start + n) << self.cluster_bits > MAX_HOST_OFFSET:
                raise OSError(errno.EFBIG, "qcow2: image file would exceed 2^56 bytes")
            await self.update(start, n, 1)
            if self.free_hint == start:
                self.free_hint = start + n
            return start << self.cluster_bits, n

    async def _find_free_run(self, count: int) -> int:
        c = self.free_hint
        run: int | None = None
        first_free: int | None = None
        limit_cluster = MAX_HOST_OFFSET >> self.cluster_bits
        while True:
            if c >= limit_cluster:
                raise OSError(errno.EFBIG, "qcow2: no free clusters below 2^56")
            rbi = c >> self.rb_shift
            base = rbi << self.rb_shift
            stop = base + self.rb_entries
            blk = await self._block(rbi)
            if blk is None:
                if run is None:
                    run = c
                if first_free is None:
                    first_free = c
                if stop - run >= count:
                    break
                c = stop
                continue
            buf = blk[1]
            i = c - base
            if run is None:
                z = self._find_zero(buf, i, self.rb_entries)
                if z >= self.rb_entries:
                    c = stop
                    continue
                run = base + z
                if first_free is None:
                    first_free = run
                i = z
            need_end = run + count
            nz = self._find_nonzero(buf, i, min(self.rb_entries, need_end - base))
            if base + nz >= need_end:
                break
            if nz >= self.rb_entries:
                c = stop
                continue
            run = None
            c = base + nz + 1
        if first_free is not None:
            self.free_hint = first_free
        return run

    def _find_zero(self, buf: bytearray, start: int, end: int) -> int:
        if self.order >= 3:
            w = 1 << (self.order - 3)
            z = bytes(w)
            pos = buf.find(z, start * w, end * w)
            while pos != -1 and pos % w:
                pos = buf.find(z, (pos // w + 1) * w, end * w)
            return end if pos == -1 else pos // w
        for i in range(start, end):
            if not self._get(buf, i):
                return i
        return end

    def _find_nonzero(self, buf: bytearray, start: int, end: int) -> int:
        if start >= end:
            return end
        if self.order >= 3:
            w = 1 << (self.order - 3)
            seg = buf[start * w : end * w]
            skipped = len(seg) - len(seg.lstrip(b"\0"))
            return start + skipped // w
        for i in range(start, end):
            if self._get(buf, i):
                return i
        return end

    async def _create_blocks(self, rbis: list[int], first_cluster: int) -> None:
        """Refcount blocks for ranges *rbis*, on clusters first_cluster, first_cluster+1, …
        (all free), each counted by the new block or an existing one covering it."""
        cb = self.cluster_bits
        bufs = {r: bytearray(self.cluster_size) for r in rbis}
        places = {r: first_cluster + j for j, r in enumerate(rbis)}
        for cluster in places.values():
            owner = cluster >> self.rb_shift
            if owner in bufs:
                self._set(bufs[owner], cluster & (self.rb_entries - 1), 1)
            else:
                await self.update(cluster, 1, 1)
        # Every count of the new blocks' clusters, then the blocks themselves, must be
        # stable before the table points to them.
        await self.cache.flush()
        for r in rbis:
            await self.io.write_meta(places[r] << cb, bytes(bufs[r]))
        await self.io.sync()
        for r in _owners_first(rbis, {r: places[r] >> self.rb_shift for r in rbis}):
            await self.io.write_meta(self.table_offset + r * 8, struct.pack(">Q", places[r] << cb))
            self.table[r] = places[r] << cb
            self.meta_clusters.add(places[r])
        for r in rbis:
            await self.cache.install(places[r] << cb, bufs[r], dirty=False)

    async def _grow_table(self, min_rbi: int) -> None:
        """Move the refcount table to a bigger one that has an entry for *min_rbi*."""
        cs = self.cluster_size
        old_len = len(self.table)
        base = old_len << self.rb_shift  # first cluster no block describes yet
        want = max(min_rbi + 1, old_len + (old_len + 1) // 2)
        new_clusters = -(-want * 8 // cs)
        nblocks = 0
        while True:
            total = new_clusters + nblocks
            last_rb = (base + total - 1) >> self.rb_shift
            need_blocks = last_rb - old_len + 1
            need_entries = max(last_rb + 1, min_rbi + 1)
            if new_clusters * cs // 8 < need_entries:
                new_clusters = -(-need_entries * 8 // cs)
                continue
            if need_blocks <= nblocks:
                break
            nblocks = need_blocks
        if new_clusters * cs > MAX_REFTABLE_BYTES:
            raise OSError(errno.EFBIG, "qcow2: refcount table would exceed 8 MiB")
        total = new_clusters + nblocks
        if (base + total) << self.cluster_bits > MAX_HOST_OFFSET:
            raise OSError(errno.EFBIG, "qcow2: image file would exceed 2^56 bytes")
        # Layout: the new blocks, then the new table, all in the fresh area from *base*.
        new_table = list(self.table) + [0] * (new_clusters * cs // 8 - old_len)
        blocks: dict[int, bytearray] = {}
        for j in range(nblocks):
            rbi = old_len + j
            new_table[rbi] = (base + j) << self.cluster_bits
            blocks[rbi] = bytearray(cs)
        for c in range(base, base + total):
            rbi = c >> self.rb_shift
            self._set(blocks[rbi], c & (self.rb_entries - 1), 1)
        for rbi, buf in blocks.items():
            await self.io.write_meta(new_table[rbi], bytes(buf))
        table_off = (base + nblocks) << self.cluster_bits
        await self.io.write_meta(table_off, struct.pack(f">{len(new_table)}Q", *new_table))
        await self.io.sync()
        await self.io.write_header(OFF_REFTABLE, struct.pack(">QI", table_off, new_clusters))
        await self.io.sync()
        old_off, old_clusters = self.table_offset, self.table_clusters
        self.table = new_table
        self.table_offset = table_off
        self.table_clusters = new_clusters
        for rbi, buf in blocks.items():
            await self.cache.install(new_table[rbi], buf, dirty=False)
        first_old = old_off >> self.cluster_bits
        self.meta_clusters.difference_update(range(first_old, first_old + old_clusters))
        self.meta_clusters.update(range(base, base + total))
        # Nothing points to the old table any more (the header is stable): free it now.
        await self.update(first_old, old_clusters, -1)

    async def flush(self) -> None:
        await self.cache.flush()


def _owners_first(rbis: list[int], owner: dict[int, int]) -> list[int]:
    """The order in which to link new refcount blocks: a block only after the block that
    counts its own cluster (*owner*), if that is new too. The new blocks sit after the data
    they were made for, so their counts are usually in the last new block; linked in index
    order, a kill in between would leave every earlier one referenced with refcount 0.
    (Places grow with the index, so owners do too: there is no cycle.)"""
    pending = set(rbis)
    order: list[int] = []
    while pending:
        ready = sorted(r for r in pending if owner[r] == r or owner[r] not in pending)
        assert ready, "refcount blocks owning each other"
        order += ready
        pending.difference_update(ready)
    return order
