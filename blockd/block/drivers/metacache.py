"""Metadata of image formats read through a file node: a bounded write-back cache of
fixed-size tables (QEMU's block/qcow2-cache.c) and reads that see zeroes past the end of the
file, as QEMU's block layer pads them.

qcow2 keeps its L2 tables and refcount blocks in one cache each; vmdk keeps the grain tables
and the pages of its grain directory in one per extent. Tables are kept as the bytes they have
on disk (big-endian for qcow2, little-endian for vmdk), so writing one back is a plain write
and nothing is converted twice.

Why write-back and not write-through: a sequential qcow2 write allocating 16 clusters would
otherwise cost two extra small writes per request. Ordering is kept by a *before_writeback*
hook: qcow2's L2 cache writes (and syncs) the refcount cache first, so an L2 entry never
reaches the disk before the refcount that covers its cluster. A user that writes its entries
through itself (vmdk, where QEMU updates a grain table entry on disk at once) never marks a
table dirty and gets a plain bounded read cache.

**Concurrency:** callers hold their driver's metadata lock. A table returned by :meth:`get`
stays valid only until the next ``await`` on this cache; callers modify it and call
:meth:`mark_dirty` without awaiting in between.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from blockd.block.node import BlockNode


class MetadataIO(Protocol):
    async def read_meta(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview: ...

    async def write_meta(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...


class MetadataCache:
    def __init__(
        self,
        io: MetadataIO,
        table_size: int,
        capacity: int,
        before_writeback: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.io = io
        self.table_size = table_size
        self.capacity = max(2, capacity)
        self.before_writeback = before_writeback
        self._tables: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: set[int] = set()

    def __contains__(self, offset: int) -> bool:
        return offset in self._tables

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    async def get(self, offset: int) -> bytearray:
        """The table at host *offset*, loaded on a miss (reads past EOF give zeroes)."""
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
            return table
        data = bytearray(await self.io.read_meta(offset, self.table_size))
        await self._make_room()
        cached = self._tables.get(offset)
        if cached is not None:  # pragma: no cover - loaded meanwhile (callers hold the lock)
            return cached
        self._tables[offset] = data
        return data

    async def install(self, offset: int, data: bytearray, dirty: bool = True) -> bytearray:
        """Put a table that exists only in memory so far (a new L2 table, a new refblock)."""
        await self._make_room()
        self._tables[offset] = data
        self._tables.move_to_end(offset)
        if dirty:
            self._dirty.add(offset)
        else:
            self._dirty.discard(offset)
        return data

    def mark_dirty(self, offset: int, table: bytearray) -> None:
        if self._tables.get(offset) is not table:
            raise AssertionError(f"metadata cache: table {offset:#x} changed after eviction")
        self._dirty.add(offset)

    def drop(self, offset: int) -> None:
        """Forget a table whose cluster is being freed (its contents no longer matter)."""
        self._tables.pop(offset, None)
        self._dirty.discard(offset)

    async def flush(self) -> None:
        """Write every dirty table, in offset order, contiguous tables in one write."""
        if not self._dirty:
            return
        if self.before_writeback is not None:
            await self.before_writeback()
        offsets = sorted(self._dirty)
        i = 0
        while i < len(offsets):
            j = i + 1
            while j < len(offsets) and offsets[j] == offsets[j - 1] + self.table_size:
                j += 1
            if j - i == 1:
                buf: bytes | bytearray = self._tables[offsets[i]]
            else:
                buf = b"".join(self._tables[o] for o in offsets[i:j])
            await self.io.write_meta(offsets[i], bytes(buf))
            for o in offsets[i:j]:
                self._dirty.discard(o)
            i = j

    async def _make_room(self) -> None:
        while len(self._tables) >= self.capacity:
            victim = next((o for o in self._tables if o not in self._dirty), None)
            if victim is None:
                await self.flush()
                continue
            del self._tables[victim]

    def clear(self) -> None:
        self._tables.clear()
        self._dirty.clear()


async def read_zero_padded(
    node: BlockNode, offset: int, nbytes: int
) -> bytes | bytearray | memoryview:
    """Read from *node*; bytes past its end read as zeroes (QEMU's block layer pads reads
    of a protocol node past its end, and image formats rely on it for tables the file does
    not reach)."""
    length = node.length
    if offset >= length:
        return bytes(nbytes)
    if offset + nbytes <= length:
        return await node.read(offset, nbytes)
    head = await node.read(offset, length - offset)
    return bytes(head) + bytes(nbytes - (length - offset))
