"""Hosted sparse extents: VMDK4 (``KDMV``: monolithicSparse, twoGbMaxExtentSparse and
streamOptimized) and VMDK3 (``COWD``: vmfsSparse), their headers and grain tables (QEMU's
vmdk_open_vmdk4, vmdk_open_vmfs_sparse, vmdk_add_extent and get_cluster_offset).

The header checks follow QEMU's order and texts, with QEMU's integer widths (a 64-bit field
stored into a 32-bit variable wraps there, and so it does here), so that the same images are
refused with the same words. Where QEMU would divide by zero or read an unbounded table,
blockd refuses the image instead.

The grain directory (L1) is not read whole at open as QEMU does: its pages are read when first
needed, through a bounded cache, so a directory of 32 Mi entries (what the bound allows) costs
no memory until it is used. QEMU reads it at open, so blockd checks at open that the read
QEMU makes would succeed.
"""

from __future__ import annotations

import errno
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockd.block.drivers.metacache import MetadataCache, read_zero_padded
from blockd.block.drivers.vmdk.extent import (
    DATA,
    ERROR,
    SECTOR,
    UNALLOC,
    ZEROED,
    Extent,
    Run,
    check_request,
    to_int64,
)
from blockd.errors import QmpError, errno_of, strerror
from blockd.io.pool import run_blocking

if TYPE_CHECKING:
    from blockd.block.node import BlockNode

VMDK3_MAGIC = b"COWD"
VMDK4_MAGIC = b"KDMV"
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESS = 1 << 16
FLAG_MARKER = 1 << 17
COMPRESSION_DEFLATE = 1
GD_AT_END = (1 << 64) - 1
#: A grain table entry meaning "zeroes" in images with the zeroed-grain flag.
GTE_ZEROED = 1
MARKER_END_OF_STREAM = 0
MARKER_FOOTER = 3
#: QEMU's bound on the grain directory (32 Mi entries; the seed's patch lowered it from 512 Mi).
MAX_L1_ENTRIES = 32 * 1024 * 1024
MAX_CLUSTER_SECTORS = 0x200000
#: Sectors a hosted sparse extent may address (QEMU's VMDK_EXTENT_MAX_SECTORS).
MAX_EXTENT_SECTORS = 1 << 32
#: Directory pages are read this many bytes at a time.
L1_PAGE = 4096
#: Memory for cached grain tables and directory pages of a whole disk, shared out among its
#: sparse extents (a 1 TB twoGbMaxExtentSparse disk has 500), with QEMU's 16 tables at least.
L2_CACHE_BYTES = 4 * 1024 * 1024
L1_CACHE_BYTES = 1024 * 1024
#: Largest grain blockd holds in memory whole: a compressed grain to inflate, or a new grain
#: to fill from the parent. QEMU allows 1 GiB grains and allocates them (twice, for a
#: compressed one, which aborts qemu-storage-daemon); VMware writes 64 KiB.
MAX_GRAIN_IN_MEMORY = 16 * 1024 * 1024
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1

# version, flags, capacity, granularity, desc_offset, desc_size, num_gtes_per_gt, rgd_offset,
# gd_offset, grain_offset, filler, check_bytes, compressAlgorithm: 75 bytes after the magic.
VMDK4_HEADER = struct.Struct("<IIQQQQIQQQc4sH")
# version, flags, disk_sectors, granularity, l1dir_offset, l1dir_size, file_sectors,
# cylinders, heads, sectors_per_track.
VMDK3_HEADER = struct.Struct("<10I")
MARKER = struct.Struct("<QII")  # value (lba), size, type


@dataclass
class Vmdk4Header:
    version: int
    flags: int
    capacity: int
    granularity: int
    desc_offset: int
    desc_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    grain_offset: int
    check_bytes: bytes
    compress_algorithm: int

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview, at: int = 0) -> Vmdk4Header:
        (ver, flags, cap, gran, d_off, d_size, gtes, rgd, gd, grain, _fill, check, comp) = (
            VMDK4_HEADER.unpack_from(raw, at)
        )
        return cls(ver, flags, cap, gran, d_off, d_size, gtes, rgd, gd, grain, check, comp)

    def pack(self) -> bytes:
        return VMDK4_HEADER.pack(
            self.version,
            self.flags,
            self.capacity,
            self.granularity,
            self.desc_offset,
            self.desc_size,
            self.num_gtes_per_gt,
            self.rgd_offset,
            self.gd_offset,
            self.grain_offset,
            b"\0",
            self.check_bytes,
            self.compress_algorithm,
        )


def sectors_of(node: BlockNode) -> int:
    """The file's length in sectors, rounded up (QEMU's bdrv_nb_sectors)."""
    return -(-node.length // SECTOR)


class _Table:
    """Reads of one table area of an extent's file: QEMU reads tables with the file node's
    rules, so past the end of the file they read as zeroes and outside the largest request
    they are I/O errors. The directory reader stops at its table's end, so a page read never
    fails for bytes the table does not have."""

    def __init__(self, file: BlockNode, start: int = 0, end: int = U64) -> None:
        self.file = file
        self.start = start
        self.end = end

    async def read_meta(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        want = max(0, min(nbytes, self.end - offset))
        check_request(offset, want)
        data = await read_zero_padded(self.file, offset, want) if want else b""
        return bytes(data) + bytes(nbytes - want) if want < nbytes else data

    async def write_meta(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("vmdk tables are written through, never back")


class SparseExtent(Extent):
    """A hosted sparse extent with 32-bit grain directory and grain table entries.

    *l1_size* and *l2_size* count entries, *cluster_sectors* is the grain size in sectors.
    """

    entry_size = 4

    def __init__(
        self,
        kind: str,
        file: BlockNode,
        sectors: int,
        *,
        l1_offset: int,
        l1_backup_offset: int,
        l1_size: int,
        l2_size: int,
        cluster_sectors: int,
    ) -> None:
        super().__init__(kind, file, sectors)
        self.file: BlockNode = file
        self.l1_offset = l1_offset
        self.l1_backup_offset = l1_backup_offset
        self.l1_size = l1_size
        self.l2_size = l2_size
        self.cluster_sectors = cluster_sectors
        # QEMU keeps this product in 32 bits.
        self.l1_entry_sectors = (l2_size * cluster_sectors) & U32
        self.next_cluster_sector = -(-sectors_of(file) // cluster_sectors) * cluster_sectors
        self.has_zero_grain = False
        self.has_marker = False
        self.version = 0
        es = self.entry_size
        self.table_bytes = l2_size * es
        self.l1 = MetadataCache(_Table(file, l1_offset, l1_offset + l1_size * es), L1_PAGE, 64)
        self.l1_backup = MetadataCache(
            _Table(file, l1_backup_offset, l1_backup_offset + l1_size * es), L1_PAGE, 16
        )
        self.l2 = MetadataCache(_Table(file), max(self.table_bytes, 1), 16)
        self.share_caches(1)
        self._grain_cache: tuple[int, bytes] | None = None

    @property
    def cluster_size(self) -> int:
        return self.cluster_sectors * SECTOR

    def share_caches(self, extents: int) -> None:
        """Size the caches for one of *extents* sparse extents of a disk."""
        self.l2.capacity = max(16, L2_CACHE_BYTES // extents // max(self.table_bytes, 1))
        self.l1.capacity = max(4, L1_CACHE_BYTES // extents // L1_PAGE)

    def reach(self, end: int) -> int:
        """QEMU serves a request grain by grain without looking at the extent's end, so a
        last grain cut short by the capacity still serves the guest bytes after the extent's
        end (up to the grain's end), ahead of the next extent. Odd, but that is what those
        bytes read as (and where they are written) in QEMU."""
        cs = self.cluster_size
        return min(end, self.start + -(-(self.end - self.start) // cs) * cs)

    def check_tables(self) -> None:
        """Fail the open where QEMU's read of the directories at open fails."""
        n = self.l1_size * self.entry_size
        for what, at in (("l1 table", self.l1_offset), ("l1 backup table", self.l1_backup_offset)):
            if what == "l1 table" or at:
                try:
                    check_request(at, n)
                except OSError as exc:
                    raise QmpError(
                        f"Could not read {what} from extent '{self.file.filename}': "
                        f"{strerror(errno_of(exc))}"
                    ) from None

    # -- lookups ---------------------------------------------------------------------------
    async def _l1_entry(self, cache: MetadataCache, base: int, index: int) -> int:
        es = self.entry_size
        pos = base + index * es
        page_at = pos - (pos - base) % L1_PAGE
        page = await cache.get(page_at)
        return int.from_bytes(page[pos - page_at : pos - page_at + es], "little")

    async def l2_sector(self, l1_index: int) -> int | None:
        """The sector of the grain table for *l1_index*: 0 when there is none, None when
        the directory entry is corrupt (QEMU's VMDK_ERROR)."""
        return await self._l1_entry(self.l1, self.l1_offset, l1_index)

    async def backup_l2_sector(self, l1_index: int) -> int:
        return await self._l1_entry(self.l1_backup, self.l1_backup_offset, l1_index)

    def decode(self, entry: int) -> tuple[int, int]:
        """(kind, host sector) of a grain table entry."""
        if entry == GTE_ZEROED and self.has_zero_grain:
            return ZEROED, 0
        if entry == 0:
            return UNALLOC, 0
        return DATA, entry

    async def table(self, l2_sector: int) -> bytearray:
        return await self.l2.get(l2_sector * SECTOR)

    async def map(self, offset: int, end: int, first_only: bool = False) -> list[Run]:
        rel = offset - self.start
        l1_index = (rel >> 9) // self.l1_entry_sectors
        span_end = self.start + (l1_index + 1) * self.l1_entry_sectors * SECTOR
        end = min(end, span_end)
        if l1_index >= self.l1_size:
            return [Run(ERROR, offset, end - offset)]
        try:
            l2 = await self.l2_sector(l1_index)
            if l2 is None:
                return [Run(ERROR, offset, end - offset)]
            if l2 == 0:
                return [Run(UNALLOC, offset, end - offset)]
            table = await self.table(l2)
        except OSError:
            return [Run(ERROR, offset, end - offset)]
        return self._runs(table, offset, end, first_only)

    def _runs(self, table: bytearray, offset: int, end: int, first_only: bool) -> list[Run]:
        cs = self.cluster_size
        es = self.entry_size
        fmt = "<Q" if es == 8 else "<I"
        # Grain table indexes follow the guest offset one by one, unless QEMU's 32-bit
        # product of table size and grain size wrapped (then only entry by entry is right).
        linear = self.l1_entry_sectors == self.l2_size * self.cluster_sectors
        runs: list[Run] = []
        pos = offset
        while pos < end:
            c_rel = pos - self.start
            c_start = pos - c_rel % cs
            c_end = min(c_start + cs, end)
            index = ((c_rel >> 9) // self.cluster_sectors) % self.l2_size
            (entry,) = struct.unpack_from(fmt, table, index * es)
            if entry == 0 and linear:
                # A run of unallocated grains, measured in C.
                last = index + (end - c_start - 1) // cs
                chunk = table[index * es : (last + 1) * es]
                zeros = (len(chunk) - len(chunk.lstrip(b"\0"))) // es
                c_end = min(c_start + max(zeros, 1) * cs, end)
            kind, host_sector = self.decode(entry)
            host = 0
            if kind == DATA:
                host = to_int64(host_sector << 9)
                host = host if self.compressed else host + pos - c_start
            prev = runs[-1] if runs else None
            if (
                prev is not None
                and prev.kind == kind
                and (kind != DATA or (not self.compressed and prev.host + prev.length == host))
            ):
                prev.length += c_end - pos
            elif prev is not None and first_only:
                break
            else:
                runs.append(Run(kind, pos, c_end - pos, host, self.compressed and kind == DATA))
            pos = c_end
        return runs

    # -- compressed grains ------------------------------------------------------------------
    async def read_grain(self, grain: int, within: int, nbytes: int) -> bytes:
        """*nbytes* at *within* of the compressed grain stored at *grain* (QEMU's
        vmdk_read_extent): EINVAL where QEMU's inflate or its checks fail."""
        cached = self._grain_cache
        if cached is None or cached[0] != grain:
            cs = self.cluster_size
            check_request(grain, 2 * cs)
            buf = bytes(await read_zero_padded(self.file, grain, 2 * cs))
            data, data_len = buf, cs
            if self.has_marker:
                data_len = MARKER.unpack_from(buf)[1]
                data = buf[12:]
            if not data_len or data_len > 2 * cs:
                raise OSError(errno.EINVAL, "vmdk: bad compressed grain size")
            out = await run_blocking(_inflate, data[:data_len], cs)
            cached = (grain, out)
            self._grain_cache = cached
        out = cached[1]
        if within + nbytes > len(out):
            raise OSError(errno.EINVAL, "vmdk: read past the end of a compressed grain")
        return out[within : within + nbytes]

    # -- writing entries -----------------------------------------------------------------------
    async def set_entries(
        self,
        l1_index: int,
        l2_sector: int,
        first: int,
        values: list[int],
        flush: Callable[[], Awaitable[None]],
    ) -> None:
        """Write grain table entries *first*.. of one table, in the table and in its backup
        (QEMU's vmdk_L2update), then flush, then update the cache."""
        packed = struct.pack(f"<{len(values)}I", *values)
        await write_grown(self.file, l2_sector * SECTOR + first * 4, packed)
        if self.l1_backup_offset:
            backup = await self.backup_l2_sector(l1_index)
            # QEMU writes through a backup entry of 0 into the header; blockd leaves it.
            if backup:
                await write_grown(self.file, backup * SECTOR + first * 4, packed)
        await flush()
        key = l2_sector * SECTOR
        if key in self.l2:
            table = await self.l2.get(key)
            table[first * 4 : first * 4 + len(packed)] = packed
        self._grain_cache = None


def _inflate(data: bytes, limit: int) -> bytes:
    """zlib's uncompress() into a buffer of *limit* bytes: the stream must end within it."""
    try:
        d = zlib.decompressobj()
        out = d.decompress(data, limit)
        if not d.eof and (d.decompress(d.unconsumed_tail, 1) or not d.eof):
            raise OSError(errno.EINVAL, "vmdk: compressed grain does not inflate")
    except zlib.error:
        raise OSError(errno.EINVAL, "vmdk: compressed grain does not inflate") from None
    return out


async def write_grown(node: BlockNode, offset: int, data: bytes | bytearray | memoryview) -> None:
    """Write to an extent's file, growing it first where the write reaches past its end (QEMU
    lets a format write past the end of its file)."""
    check_request(offset, len(data))
    end = offset + len(data)
    if end > node.length:
        await node.truncate(end)
    await node.write(offset, data)


# -- opening ---------------------------------------------------------------------------------
def add_extent_checks(l1_size: int, cluster_sectors: int) -> None:
    """QEMU's vmdk_add_extent refusals, in its order."""
    if cluster_sectors > MAX_CLUSTER_SECTORS:
        raise QmpError("Invalid granularity, image may be corrupt")
    if l1_size > MAX_L1_ENTRIES:
        raise QmpError("L1 size too big")


async def open_vmdk4(
    file: BlockNode, kind: str, read_only: bool, top_file: BlockNode
) -> tuple[SparseExtent | None, Vmdk4Header]:
    """The extent of a VMDK4 file, or None with the header when the header only points to an
    embedded descriptor (capacity 0), which the caller then opens. *top_file* is the file of
    the vmdk node itself: QEMU finds a footer from that file's length (which only makes
    sense for monolithic images, and blockd keeps it that way)."""
    raw = await read_zero_padded(file, 4, VMDK4_HEADER.size)
    hdr = Vmdk4Header.unpack(raw)
    if hdr.capacity == 0 and hdr.desc_offset:
        return None, hdr
    if hdr.gd_offset == GD_AT_END:
        hdr = await _read_footer(file, top_file)
    compressed = hdr.compress_algorithm == COMPRESSION_DEFLATE
    if hdr.version > 3:
        raise QmpError(f"Unsupported VMDK version {hdr.version}")
    if hdr.version == 3 and not read_only and not compressed:
        raise QmpError("VMDK version 3 must be read only")
    if hdr.num_gtes_per_gt > 512:
        raise QmpError("L2 table size too big")
    l1_entry_sectors = (hdr.num_gtes_per_gt * hdr.granularity) & U32
    if l1_entry_sectors == 0:
        raise QmpError("L1 entry size is invalid")
    l1_size = (((hdr.capacity + l1_entry_sectors - 1) & U64) // l1_entry_sectors) & U32
    backup = to_int64(hdr.rgd_offset << 9) if hdr.flags & FLAG_RGD else 0
    if sectors_of(file) < hdr.grain_offset:
        need = to_int64(hdr.grain_offset * SECTOR)
        raise QmpError(f"File truncated, expecting at least {need} bytes")
    add_extent_checks(l1_size, hdr.granularity)
    ext = SparseExtent(
        kind,
        file,
        to_int64(hdr.capacity),
        l1_offset=to_int64(hdr.gd_offset << 9),
        l1_backup_offset=backup,
        l1_size=l1_size,
        l2_size=hdr.num_gtes_per_gt,
        cluster_sectors=hdr.granularity,
    )
    ext.compressed = compressed
    ext.has_marker = bool(hdr.flags & FLAG_MARKER)
    ext.has_zero_grain = bool(hdr.flags & FLAG_ZERO_GRAIN)
    ext.version = hdr.version
    ext.check_tables()
    return ext, hdr


def grain_size_refusal(ext: SparseExtent, read_only: bool) -> str | None:
    """Why blockd refuses an extent whose grains it would have to hold in memory whole (see
    MAX_GRAIN_IN_MEMORY), or None."""
    cs = ext.cluster_size
    if cs <= MAX_GRAIN_IN_MEMORY:
        return None
    if ext.compressed:
        return (
            f"vmdk: compressed grains of {cs} bytes are not supported by blockd "
            f"(at most {MAX_GRAIN_IN_MEMORY})"
        )
    if not read_only:
        return (
            f"vmdk: grains of {cs} bytes are too large for blockd to write; open the image "
            "read-only"
        )
    return None


async def _read_footer(file: BlockNode, top_file: BlockNode) -> Vmdk4Header:
    at = sectors_of(top_file) * SECTOR - 1536
    try:
        check_request(at, 1536)
        buf = bytes(await read_zero_padded(file, at, 1536))
    except OSError as exc:
        raise QmpError(f"Failed to read footer: {strerror(errno_of(exc))}") from None
    _v, fm_size, fm_type = MARKER.unpack_from(buf, 0)
    eos_val, eos_size, eos_type = MARKER.unpack_from(buf, 1024)
    if (
        buf[512:516] != VMDK4_MAGIC
        or fm_size != 0
        or fm_type != MARKER_FOOTER
        or eos_val != 0
        or eos_size != 0
        or eos_type != MARKER_END_OF_STREAM
    ):
        raise QmpError("Invalid footer")
    return Vmdk4Header.unpack(buf, 516)


async def open_vmdk3(file: BlockNode, kind: str) -> SparseExtent:
    """A ``COWD`` (vmfsSparse) extent."""
    raw = await read_zero_padded(file, 4, VMDK3_HEADER.size)
    _ver, _flags, disk_sectors, granularity, l1dir_offset, l1dir_size = VMDK3_HEADER.unpack(raw)[:6]
    add_extent_checks(l1dir_size, granularity)
    if granularity == 0 or (4096 * granularity) & U32 == 0:
        # QEMU divides by these on the first access (and by the first at open).
        raise QmpError("Invalid granularity, image may be corrupt")
    ext = SparseExtent(
        kind,
        file,
        disk_sectors,
        l1_offset=l1dir_offset << 9,
        l1_backup_offset=0,
        l1_size=l1dir_size,
        l2_size=4096,
        cluster_sectors=granularity,
    )
    ext.check_tables()
    return ext
