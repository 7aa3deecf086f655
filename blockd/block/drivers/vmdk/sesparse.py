"""VMware seSparse extents (ESXi 6.5+ snapshots), read only (QEMU's vmdk_open_se_sparse and
the seSparse half of get_cluster_offset; the layout is in ../shared/docs/sesparse.md).

VMware publishes no specification, so QEMU checks every header field it does not understand
and refuses the image rather than guess; blockd makes the same checks in the same order with
the same texts. The journal, free bitmap and backmap are never read: without a journal replay
(a dirty image is refused) the grain directory and tables alone say where the data is.

Grain directory entries are indexes of preallocated grain tables, grain table entries are
typed indexes of grains; a corrupt entry is treated as QEMU treats it: reads of that range
show the parent (or zeroes), block status fails with EIO.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from blockd.block.drivers.metacache import read_zero_padded
from blockd.block.drivers.vmdk.extent import (
    DATA,
    ERROR,
    SECTOR,
    UNALLOC,
    ZEROED,
    check_request,
    to_int64,
)
from blockd.block.drivers.vmdk.sparse import SparseExtent, add_extent_checks
from blockd.errors import QmpError, errno_of, strerror

if TYPE_CHECKING:
    from blockd.block.node import BlockNode

CONST_MAGIC = 0x00000000CAFEBABE
VOLATILE_MAGIC = 0x00000000CAFECAFE
VERSION_2_1 = 0x0000000200000001
#: 26 little-endian u64 fields, then 304 bytes of padding.
CONST_HEADER = struct.Struct("<26Q304s")
#: magic, free_gt_number, next_txn_seq_number, replay_journal, then 480 bytes of padding.
VOLATILE_HEADER = struct.Struct("<4Q480s")
NO_WRITE = "No write support for seSparse images available"
U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1

# Field positions in the constant header.
MAGIC, VERSION, CAPACITY, GRAIN_SIZE, GT_SIZE, FLAGS = range(6)
RESERVED = slice(6, 10)
VOLATILE_OFFSET = 10
GD_OFFSET, GD_SIZE, GT_OFFSET = 16, 17, 18
GRAINS_OFFSET = 24


def check_const_header(f: tuple[int, ...], pad: bytes) -> None:
    if f[MAGIC] != CONST_MAGIC:
        raise QmpError(f"Bad const header magic: 0x{f[MAGIC]:016x}")
    if f[VERSION] != VERSION_2_1:
        raise QmpError(f"Unsupported version: 0x{f[VERSION]:016x}")
    if f[GRAIN_SIZE] != 8:
        raise QmpError(f"Unsupported grain size: {f[GRAIN_SIZE]}")
    if f[GT_SIZE] != 64:
        raise QmpError(f"Unsupported grain table size: {f[GT_SIZE]}")
    if f[FLAGS] != 0:
        raise QmpError(f"Unsupported flags: 0x{f[FLAGS]:016x}")
    if any(f[RESERVED]):
        words = " ".join(f"0x{v:016x}" for v in f[RESERVED])
        raise QmpError(f"Unsupported reserved bits: {words}")
    if any(pad):
        raise QmpError("Unsupported non-zero const header padding")


def check_volatile_header(raw: bytes | bytearray | memoryview) -> None:
    magic, _free_gt, _next_txn, replay, pad = VOLATILE_HEADER.unpack_from(raw)
    if magic != VOLATILE_MAGIC:
        raise QmpError(f"Bad volatile header magic: 0x{magic:016x}")
    if replay:
        raise QmpError("Image is dirty, Replaying journal not supported")
    if any(pad):
        raise QmpError("Unsupported non-zero volatile header padding")


class SeSparseExtent(SparseExtent):
    """64-bit entries: directory entries are grain table indexes, table entries typed grain
    indexes. Never written."""

    entry_size = 8
    sesparse = True

    def __init__(self, kind: str, file: BlockNode, f: tuple[int, ...]) -> None:
        # QEMU passes the directory size through a 32-bit parameter, after a 64-bit multiply.
        l1_size = (((f[GD_SIZE] * SECTOR) & U64) // 8) & U32
        super().__init__(
            kind,
            file,
            to_int64(f[CAPACITY]),
            l1_offset=to_int64(f[GD_OFFSET] * SECTOR),
            l1_backup_offset=0,
            l1_size=l1_size,
            l2_size=f[GT_SIZE] * SECTOR // 8,
            cluster_sectors=f[GRAIN_SIZE],
        )
        self.tables_offset = f[GT_OFFSET]
        self.grains_offset = f[GRAINS_OFFSET]

    async def l2_sector(self, l1_index: int) -> int | None:
        entry = await self._l1_entry(self.l1, self.l1_offset, l1_index)
        if entry == 0:
            return 0
        if entry & 0xFFFFFFFF00000000 != 0x1000000000000000:
            return None
        sector = (self.tables_offset + (entry & U32) * (self.table_bytes // SECTOR)) & U64
        if sector > U32:
            return None
        return sector

    def decode(self, entry: int) -> tuple[int, int]:
        top = entry >> 60
        if top == 0:
            return (UNALLOC, 0) if entry == 0 else (ERROR, 0)
        if top in (1, 2):  # unmapped by the guest, or a zero grain
            return ZEROED, 0
        if top == 3:
            index = ((entry & 0x0FFF000000000000) >> 48) | ((entry & 0x0000FFFFFFFFFFFF) << 12)
            return DATA, (self.grains_offset + index * self.cluster_sectors) & U64
        return ERROR, 0


async def open_sesparse(file: BlockNode, kind: str) -> SeSparseExtent:
    """Check both headers (the caller has already applied read-only) and build the extent."""
    raw = bytes(await read_zero_padded(file, 0, CONST_HEADER.size))
    *fields, pad = CONST_HEADER.unpack(raw)
    f = tuple(int(v) for v in fields)
    check_const_header(f, pad)
    at = to_int64(f[VOLATILE_OFFSET] * SECTOR)
    try:
        check_request(at, VOLATILE_HEADER.size)
        vol = await read_zero_padded(file, at, VOLATILE_HEADER.size)
    except OSError as exc:
        raise QmpError(
            f"Could not read volatile header from file '{file.filename}': {strerror(errno_of(exc))}"
        ) from None
    check_volatile_header(vol)
    l1_size = (((f[GD_SIZE] * SECTOR) & U64) // 8) & U32
    add_extent_checks(l1_size, f[GRAIN_SIZE])
    ext = SeSparseExtent(kind, file, f)
    ext.check_tables()
    return ext
