"""The vmdk write path (QEMU's vmdk_pwritev, get_whole_cluster, vmdk_L2update,
vmdk_co_pwrite_zeroes and vmdk_write_cid).

Where QEMU writes, blockd writes the same bytes to the same places: flat extents in place;
hosted sparse grains in place when allocated, else appended at the end of the extent file
with the rest of the grain copied from the parent (or zeroed), then the grain table entry and
its backup copy, then a flush; streamOptimized grains compressed behind a marker, appended
only (an allocated grain is never rewritten: EIO, a partial grain: EINVAL, as in QEMU).
Zero writes of whole grains set zeroed-grain entries where the image has the flag; the rest
is written as zeroes. The first write after open gives the image a new random CID, so deltas
taken from it notice that it changed.

Consecutive grains of one request are written with one data write and one table update
(QEMU writes each grain, then its entry, then flushes): the order is the same (data before
the entry that points to it), so a crash leaves at worst a leaked grain, as in QEMU.

seSparse extents are never written (ENOTSUP). Two things QEMU would do are refused instead:
a write where the directory has no grain table (QEMU writes the data to an uninitialised
offset and loses it) fails with EIO, and a backup table entry of 0 is not written through
(QEMU would write into the header).
"""

from __future__ import annotations

import errno
import logging
import random
import struct
import zlib
from typing import TYPE_CHECKING

from blockd.block.driver import MiB, WriteFlags
from blockd.block.drivers.metacache import read_zero_padded
from blockd.block.drivers.vmdk import descriptor as desc
from blockd.block.drivers.vmdk.extent import DATA, SECTOR, ZEROED, FlatExtent, ZeroExtent
from blockd.block.drivers.vmdk.sparse import (
    GTE_ZEROED,
    MAX_EXTENT_SECTORS,
    SparseExtent,
    sectors_of,
    write_grown,
)
from blockd.io.pool import run_blocking

if TYPE_CHECKING:
    from blockd.block.drivers.vmdk.driver import VmdkDriver

log = logging.getLogger(__name__)

_MARKER = struct.Struct("<QI")


class _NotSupported(Exception):
    """A zero write that zeroed grains cannot express: write real zeroes instead."""


class Writer:
    def __init__(self, drv: VmdkDriver) -> None:
        self.drv = drv
        #: QEMU's cid_updated: the CID changes once per open, on the first write.
        self.cid_updated = False

    # -- data ------------------------------------------------------------------------------
    async def write(self, offset: int, data: memoryview) -> None:
        drv = self.drv
        end = offset + len(data)
        pos = offset
        async with drv.lock:
            while pos < end:
                ext = drv.find(pos)
                if ext is None:
                    raise OSError(errno.EIO, f"vmdk: no extent at {pos:#x}")
                if ext.sesparse:
                    raise OSError(errno.ENOTSUP, "vmdk: seSparse extents are read-only")
                stop = ext.reach(end)
                if isinstance(ext, ZeroExtent):
                    raise OSError(errno.EIO, "vmdk: a ZERO extent has no file to write to")
                if isinstance(ext, SparseExtent):
                    pos = await self._write_sparse(ext, pos, stop, data, offset)
                else:
                    assert isinstance(ext, FlatExtent) and ext.file is not None
                    host = ext.data_offset + pos - ext.start
                    await write_grown(ext.file, host, data[pos - offset : stop - offset])
                    pos = stop
                await self._update_cid()

    async def _table_of(self, ext: SparseExtent, pos: int) -> tuple[int, int, bytearray, int]:
        """(l1 index, grain table sector, table, end of the table's span) for *pos*."""
        rel = pos - ext.start
        l1_index = (rel >> 9) // ext.l1_entry_sectors
        span_end = ext.start + (l1_index + 1) * ext.l1_entry_sectors * SECTOR
        if l1_index >= ext.l1_size:
            raise OSError(errno.EINVAL, f"vmdk: offset {pos:#x} beyond the grain directory")
        l2 = await ext.l2_sector(l1_index)
        if l2 is None:
            raise OSError(errno.EINVAL, f"vmdk: corrupt grain directory entry at {pos:#x}")
        if l2 == 0:
            raise OSError(errno.EIO, f"vmdk: no grain table for guest offset {pos:#x}")
        return l1_index, l2, await ext.table(l2), span_end

    async def _write_sparse(
        self, ext: SparseExtent, pos: int, stop: int, data: memoryview, base: int
    ) -> int:
        """Write [pos, stop) as far as one grain table reaches; returns where it stopped."""
        l1_index, l2, table, span_end = await self._table_of(ext, pos)
        stop = min(stop, span_end)
        cs = ext.cluster_size
        batch = _Batch(ext, l1_index, l2)
        while pos < stop:
            rel = pos - ext.start
            c_start = pos - rel % cs
            n = min(stop, c_start + cs) - pos
            index = ((rel >> 9) // ext.cluster_sectors) % ext.l2_size
            kind, sector = ext.decode(struct.unpack_from("<I", table, index * 4)[0])
            chunk = data[pos - base : pos - base + n]
            if ext.compressed:
                await batch.flush(self)
                await self._write_compressed(ext, batch, pos, c_start, index, kind, chunk)
            elif kind == DATA:
                await batch.in_place((sector << 9) + pos - c_start, chunk, self)
            else:
                if ext.next_cluster_sector >= MAX_EXTENT_SECTORS:
                    raise OSError(errno.EINVAL, "vmdk: extent file is full")
                grain = await self._cow(c_start, pos - c_start, n, cs, kind == ZEROED)
                grain[pos - c_start : pos - c_start + n] = chunk
                new = ext.next_cluster_sector
                ext.next_cluster_sector += ext.cluster_sectors
                await batch.new_grain(index, new, grain, self)
            pos += n
        await batch.flush(self)
        return pos

    async def _cow(self, c_start: int, skip: int, n: int, cs: int, zeroed: bool) -> bytearray:
        """A grain's worth of what surrounds [skip, skip + n): the parent's data, or zeroes
        (QEMU's get_whole_cluster; a zeroed grain does not show its parent)."""
        grain = bytearray(cs)
        drv = self.drv
        if drv.node.backing is None:
            return grain
        if not await drv.cid_valid():
            raise OSError(errno.EINVAL, "vmdk: parent CID does not match the image's parentCID")
        if zeroed:
            return grain
        back = drv.node.backing
        if skip:
            grain[:skip] = await read_zero_padded(back, c_start, skip)
        if skip + n < cs:
            grain[skip + n :] = await read_zero_padded(back, c_start + skip + n, cs - skip - n)
        return grain

    async def _write_compressed(
        self,
        ext: SparseExtent,
        batch: _Batch,
        pos: int,
        c_start: int,
        index: int,
        kind: int,
        chunk: memoryview,
    ) -> None:
        """One streamOptimized grain, appended (QEMU's compressed branch of vmdk_pwritev)."""
        if kind == DATA:
            log.error("Could not write to allocated cluster for streamOptimized")
            raise OSError(errno.EIO, "vmdk: streamOptimized grains are written once")
        if ext.next_cluster_sector >= MAX_EXTENT_SECTORS:
            raise OSError(errno.EINVAL, "vmdk: extent file is full")
        cs = ext.cluster_size
        sector = ext.next_cluster_sector
        ext.next_cluster_sector += ext.cluster_sectors
        # QEMU first fills the new grain from the parent (or with zeroes), whole.
        grain = await self._cow(c_start, 0, 0, cs, kind == ZEROED)
        whole = pos == c_start and (len(chunk) == cs or pos + len(chunk) == ext.end)
        if not whole or not ext.has_marker:
            await write_grown(ext.file, sector * SECTOR, grain)
            raise OSError(errno.EINVAL, "vmdk: streamOptimized takes whole grains only")
        packed = await run_blocking(zlib.compress, bytes(chunk))
        blob = _MARKER.pack(pos >> 9, len(packed)) + packed
        if len(blob) < cs:
            grain[: len(blob)] = blob
            out: bytes | bytearray = grain
        else:
            out = blob
        await write_grown(ext.file, sector * SECTOR, out)
        ext.next_cluster_sector = -(-(sector * SECTOR + len(blob)) // SECTOR)
        await ext.set_entries(batch.l1_index, batch.l2, index, [sector], ext.file.flush)

    # -- zeroes ----------------------------------------------------------------------------
    async def write_zeroes(self, offset: int, nbytes: int, flags: WriteFlags) -> None:
        """QEMU's block layer splits a zero write at the grain size; each piece becomes
        zeroed grains where the image can say so, else real zeroes."""
        align = max(self.drv.limits.pwrite_zeroes_alignment, 1)
        head = offset % align
        tail = (offset + nbytes) % align
        pos, left = offset, nbytes
        while left > 0:
            num = left
            if head:
                num = min(left, align - head)
                head = (head + num) % align
            elif tail and num > align:
                num -= tail
            await self._zero_piece(pos, num, flags)
            pos += num
            left -= num

    async def _zero_piece(self, offset: int, nbytes: int, flags: WriteFlags) -> None:
        try:
            async with self.drv.lock:
                await self._zero_grains(offset, nbytes, dry_run=True)
                await self._zero_grains(offset, nbytes, dry_run=False)
                await self._update_cid()
            return
        except _NotSupported:
            pass
        if flags & WriteFlags.NO_FALLBACK:
            raise OSError(errno.ENOTSUP, "vmdk: fast zero not supported here")
        zero = memoryview(bytes(min(nbytes, MiB)))
        pos, end = offset, offset + nbytes
        while pos < end:
            n = min(len(zero), end - pos)
            await self.write(pos, zero[:n])
            pos += n

    async def _zero_grains(self, offset: int, nbytes: int, dry_run: bool) -> None:
        drv = self.drv
        pos, end = offset, offset + nbytes
        while pos < end:
            ext = drv.find(pos)
            if ext is None:
                raise OSError(errno.EIO, f"vmdk: no extent at {pos:#x}")
            stop = ext.reach(end)
            if isinstance(ext, ZeroExtent):
                pos = stop
                continue
            if not isinstance(ext, SparseExtent) or ext.sesparse:
                raise _NotSupported
            try:
                l1_index, l2, table, span_end = await self._table_of(ext, pos)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    raise _NotSupported from None
                raise
            stop = min(stop, span_end)
            cs = ext.cluster_size
            todo: list[int] = []
            while pos < stop:
                rel = pos - ext.start
                index = ((rel >> 9) // ext.cluster_sectors) % ext.l2_size
                kind, _sector = ext.decode(struct.unpack_from("<I", table, index * 4)[0])
                if ext.compressed and kind == DATA:
                    raise OSError(errno.EIO, "vmdk: streamOptimized grains are written once")
                if not ext.has_zero_grain or rel % cs or stop - pos < cs:
                    raise _NotSupported
                if kind != ZEROED:
                    todo.append(index)
                pos += cs
            if not dry_run:
                for first, count in _runs(todo):
                    await ext.set_entries(l1_index, l2, first, [GTE_ZEROED] * count, ext.file.flush)

    # -- the CID -----------------------------------------------------------------------------
    async def _update_cid(self) -> None:
        """The first write of an open gives the image a new CID (QEMU's vmdk_write_cid: the
        descriptor region rewritten, as far as the file's last sector reaches)."""
        if self.cid_updated:
            return
        drv = self.drv
        file = drv.file
        region = bytes(await read_zero_padded(file, drv.desc_offset, desc.DESC_SIZE))
        new = desc.rewrite_cid(region, random.getrandbits(32))
        if new is None:
            raise OSError(errno.EINVAL, "vmdk: descriptor has no parentCID")
        n = min(desc.DESC_SIZE, sectors_of(file) * SECTOR - drv.desc_offset)
        if n > 0:
            await write_grown(file, drv.desc_offset, new[:n])
            await file.flush()
        self.cid_updated = True


class _Batch:
    """Consecutive grains of one request in one grain table, written together."""

    def __init__(self, ext: SparseExtent, l1_index: int, l2: int) -> None:
        self.ext = ext
        self.l1_index = l1_index
        self.l2 = l2
        self.host = -1
        self.buf = bytearray()
        self.new = False
        self.first_index = 0
        self.sectors: list[int] = []

    async def in_place(self, host: int, chunk: memoryview, w: Writer) -> None:
        if self.new or self.host + len(self.buf) != host:
            await self.flush(w)
            self.host = host
        self.buf += chunk

    async def new_grain(self, index: int, sector: int, grain: bytearray, w: Writer) -> None:
        contiguous = (
            self.new
            and self.host + len(self.buf) == sector * SECTOR
            and self.first_index + len(self.sectors) == index
        )
        if not contiguous:
            await self.flush(w)
            self.new, self.host, self.first_index = True, sector * SECTOR, index
        self.buf += grain
        self.sectors.append(sector)

    async def flush(self, w: Writer) -> None:
        if not self.buf:
            return
        ext = self.ext
        await write_grown(ext.file, self.host, self.buf)
        end_sector = -(-(self.host + len(self.buf)) // SECTOR)
        ext.next_cluster_sector = max(ext.next_cluster_sector, end_sector)
        if self.new:
            await ext.set_entries(
                self.l1_index, self.l2, self.first_index, self.sectors, ext.file.flush
            )
        self.buf = bytearray()
        self.sectors = []
        self.new = False
        self.host = -1


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in indexes:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out
