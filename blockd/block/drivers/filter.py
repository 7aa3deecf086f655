"""The base of the filter nodes blockd inserts itself (QEMU's block/filter-*, the job
filters copy-before-write, mirror_top, commit_top and copy-on-read).

A filter shows its ``file`` child's data unchanged; it exists to sit between the child and all
of the child's former parents, so that every request those parents make passes it (and so that
permissions can express what the job running below needs). Chain walks and block status look
through filters (``BlockNode.cow_backing``), as QEMU's bdrv_skip_filters does.

Filters are not openable with ``blockdev-add``: jobs create them with
:meth:`blockd.block.graph.BlockGraph.insert_filter` and drop them with ``remove_filter``.
"""

from __future__ import annotations

import copy
import errno
from typing import TYPE_CHECKING, Any

from blockd.block.driver import BlockDriver, WriteFlags
from blockd.block.status import Extent
from blockd.errors import QmpError

if TYPE_CHECKING:
    from blockd.block.node import BlockNode


class FilterDriver(BlockDriver):
    is_filter = True
    #: The name of the filtered child: QEMU's job filters mirror_top and commit_top hang
    #: their child as ``backing`` (which query-named-block-nodes shows as a backing image).
    child_name: str = "file"

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self._below: BlockNode | None = None

    @property
    def child(self) -> BlockNode:
        """The node below. A request that entered the filter before it was taken out
        finishes on the node that was below it (QEMU's drained section holds such a
        request in the parent and sends it there; the effect is the same)."""
        edge = self.node.children.get(self.child_name)
        if edge is not None:
            self._below = edge.node
        elif self._below is None:
            raise OSError(errno.ENOMEDIUM, f"{self.node.node_name} has no child")
        return self._below

    def on_inserted(self) -> None:
        """The filter now sits above its child: take the child's limits (a copy, so that a
        filter never changes what the child advertises)."""
        self.limits = copy.copy(self.child.driver.limits)

    # -- I/O: straight to the child --------------------------------------------------------
    def getlength(self) -> int:
        return self.child.length

    async def preadv(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        return await self.child.read(offset, nbytes)

    async def pwritev(self, offset: int, data: memoryview, flags: WriteFlags) -> None:
        await self.child.write(offset, data, flags)

    async def pwrite_zeroes(self, offset: int, nbytes: int, flags: WriteFlags) -> None:
        await self.child.write_zeroes(offset, nbytes, flags)

    async def pdiscard(self, offset: int, nbytes: int) -> None:
        await self.child.discard(offset, nbytes)

    async def block_status(self, offset: int, nbytes: int) -> Extent:
        return await self.child.block_status(offset, nbytes)

    async def flush(self) -> None:
        await self.child.flush()

    async def truncate(self, size: int, exact: bool, prealloc: str) -> None:
        raise QmpError("Cannot resize a node with a job filter above it")

    # -- reporting: the child's file, as QEMU's bdrv_refresh_filename does for filters ------
    def filename(self) -> str:
        return self.child.filename

    def actual_size(self) -> int | None:
        return self.child.driver.actual_size()

    def image_info(self) -> dict[str, Any]:
        info = self.child.driver.image_info()
        # bdrv_get_info passes through a filter: cluster size and dirty flag, nothing more.
        return {k: info[k] for k in ("cluster-size", "dirty-flag") if k in info}

    def has_zero_init(self) -> bool:
        return self.child.driver.has_zero_init()
