"""Extents: the pieces a vmdk disk is made of, and how a guest range maps onto them.

A vmdk disk is a list of extents laid end to end (QEMU's VmdkExtent array). Each answers one
question, :meth:`Extent.map`: how do the bytes of a guest range look in this extent, as runs
of one kind each (data at a host offset, compressed data, zeroes, unallocated, corrupt).
Reads, writes and block status are built on that answer in driver.py; sparse.py and
sesparse.py hold the extents with grain tables, this module the ones without.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blockd.block.node import BlockNode

SECTOR = 512
#: QEMU's BDRV_MAX_LENGTH: a request on a file node ending past it is an I/O error.
MAX_LENGTH = (1 << 63) - (1 << 30)

# Kinds of runs (QEMU's VMDK_OK / VMDK_UNALLOC / VMDK_ZEROED / VMDK_ERROR).
DATA = 0
UNALLOC = 1
ZEROED = 2
#: The tables say nothing sensible here: reads show the backing file (or zeroes), as in
#: QEMU, block status fails with EIO, writes with EINVAL.
ERROR = 3


@dataclass(slots=True)
class Run:
    """*length* guest bytes from *offset* that read the same way.

    For DATA, *host* is the offset of *offset* in the extent's file; for compressed data it
    is the offset of the grain (its marker) instead, and the run stays within one grain.
    """

    kind: int
    offset: int
    length: int
    host: int = 0
    compressed: bool = False


def check_request(offset: int, nbytes: int) -> None:
    """QEMU's bounds on a request to a file node: a table or grain offset that overflowed
    into a negative number or past BDRV_MAX_LENGTH is an I/O error, not a read of zeroes."""
    if offset < 0 or nbytes > MAX_LENGTH or offset > MAX_LENGTH - nbytes:
        raise OSError(errno.EIO, f"vmdk: request at {offset:#x} outside the file's range")


def to_int64(value: int) -> int:
    """An unsigned 64-bit value as C's int64_t sees it."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


class Extent:
    """One extent: *sectors* long, starting at guest byte *start*.

    *kind* is the type word of its descriptor line ("" for a sparse file opened directly).
    """

    flat = False
    compressed = False
    sesparse = False

    def __init__(self, kind: str, file: BlockNode | None, sectors: int) -> None:
        self.kind = kind
        self.file = file
        self.sectors = sectors
        self.start = 0

    @property
    def end(self) -> int:
        return self.start + self.sectors * SECTOR

    @property
    def cluster_size(self) -> int:
        return self.sectors * SECTOR

    def reach(self, end: int) -> int:
        """How far a request ending at *end* is served by this extent (see SparseExtent)."""
        return min(end, self.end)

    async def map(self, offset: int, end: int, first_only: bool = False) -> list[Run]:
        """Runs covering [offset, end) from *offset* on, as far as one table reaches (at
        least one run; only the first with *first_only*); *end* lies within this extent."""
        raise NotImplementedError

    def info(self) -> dict[str, object]:
        """This extent in ``format-specific.data.extents`` (QEMU's VmdkExtentInfo)."""
        out: dict[str, object] = {
            "filename": self.file.filename if self.file is not None else "",
            "format": self.kind,
            "virtual-size": self.sectors * SECTOR,
        }
        if self.compressed:
            out["compressed"] = True
        if not self.flat:
            out["cluster-size"] = self.cluster_size
        return out


class FlatExtent(Extent):
    """FLAT and VMFS extents: the guest bytes lie in a file from *data_offset* on."""

    flat = True

    def __init__(self, kind: str, file: BlockNode, sectors: int, flat_sector: int) -> None:
        super().__init__(kind, file, sectors)
        # QEMU shifts the sector count into an int64_t: huge values wrap negative and every
        # request then fails the file node's bounds check.
        self.data_offset = to_int64(flat_sector << 9)

    async def map(self, offset: int, end: int, first_only: bool = False) -> list[Run]:
        return [Run(DATA, offset, end - offset, self.data_offset + offset - self.start)]


class ZeroExtent(Extent):
    """``RW <sectors> ZERO``: VMware's extent with no file that reads as zeroes."""

    flat = True

    def __init__(self, sectors: int) -> None:
        super().__init__("ZERO", None, sectors)

    async def map(self, offset: int, end: int, first_only: bool = False) -> list[Run]:
        return [Run(ZEROED, offset, end - offset)]
