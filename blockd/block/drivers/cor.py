"""The copy-on-read filter of a stream job (QEMU's block/copy-on-read.c with a ``bottom``).

The stream job inserts it above the node it streams into; every parent of that node (an NBD
export, an overlay above it) then reads through it. A read of a range the node does not
allocate itself, but some image from its backing down to *bottom* does, becomes a
copy-on-read request on the node (:meth:`BlockNode.copy_on_read`): the guest's own reads help
the stream along, and the job populates the node through the same serialised path. Ranges
that only images below *bottom* hold are read plainly: they stay in the chain.

While inserted the filter holds the chain from itself down to *bottom* frozen, as QEMU's
cor_open does, so no graph change can remove an image the job still copies from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockd.block.driver import register_driver
from blockd.block.drivers.filter import FilterDriver
from blockd.block.jsonname import json_name, open_options
from blockd.block.perm import ChildRole, Perm
from blockd.block.status import BlockStatus

if TYPE_CHECKING:
    from blockd.block.node import BlockNode

#: What the filter passes through from its parents (QEMU's PERM_PASSTHROUGH for this driver);
#: everything else it shares, and it always takes WRITE_UNCHANGED for its copies.
_PASSTHROUGH = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
_UNCHANGED = Perm.all() & ~_PASSTHROUGH


@register_driver
class CopyOnReadDriver(FilterDriver):
    format_name = "copy-on-read"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        #: The last image whose data is copied up; None: the whole chain.
        self.bottom: BlockNode | None = None

    def child_perm(self, role: ChildRole, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        return (perm & _PASSTHROUGH) | Perm.WRITE_UNCHANGED, (shared & _PASSTHROUGH) | _UNCHANGED

    def _below_bottom(self) -> BlockNode | None:
        """The first image under *bottom*: block status above it covers the images the
        filter copies from."""
        return self.bottom.cow_backing() if self.bottom is not None else None

    async def _copies(self, offset: int, nbytes: int) -> tuple[bool, int]:
        """Whether the range from *offset* is one to copy up, and for how long the answer
        holds. A failed status query copies anyway, as QEMU does."""
        child = self.child
        try:
            ext = await child.block_status(offset, nbytes)
            if ext.flags & BlockStatus.ALLOCATED:
                return False, ext.length
            below = child.cow_backing()
            if below is None:
                return False, ext.length
            above = await below.block_status_above(offset, ext.length, self._below_bottom())
        except OSError:
            return True, nbytes
        if above.flags & BlockStatus.EOF or above.length <= 0:
            return False, ext.length
        return bool(above.flags & BlockStatus.ALLOCATED), above.length

    async def preadv(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        child = self.child
        if self.bottom is None:
            return await child.copy_on_read(offset, nbytes)
        out = bytearray(nbytes)
        pos, end = offset, offset + nbytes
        while pos < end:
            copy, n = await self._copies(pos, end - pos)
            n = max(1, min(n, end - pos))
            if copy:
                data = await child.copy_on_read(pos, n)
            else:
                data = await child.read(pos, n)
            out[pos - offset : pos - offset + n] = data
            pos += n
        return out

    async def populate(self, offset: int, nbytes: int, zero: bool = False) -> None:
        """The stream job's read (QEMU's BDRV_REQ_PREFETCH): copy the range up, return
        nothing. The job has already chosen ranges that lie above *bottom*."""
        await self.child.copy_on_read(offset, nbytes, prefetch=True, zero=zero)

    def filename(self) -> str:
        # A filter cannot be probed, so QEMU names it by its options (bdrv_refresh_filename).
        return json_name({"driver": self.format_name, "file": open_options(self.child)})
