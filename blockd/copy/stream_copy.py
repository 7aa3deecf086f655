"""The copy engine in a stream job's shape: it copies *up* into one node, from the images
between that node and a base, through the node's copy-on-read path.

It is :class:`BlockCopy` with two differences. What to copy is what some image between the
node and the base allocates while the node itself does not (block status above the base);
everything else is skipped. And a range moves as one copy-on-read request on the node
(:meth:`BlockNode.copy_on_read`, via the copy-on-read filter), never as a read followed by
a separate write: the request is serialised against guest writes to the node and checks the
node's allocation inside, so a guest write is never overwritten by stale backing data. Claims,
tasks in flight, retries after a failure and the speed limit are the engine's own.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from blockd.block.status import BlockStatus
from blockd.copy.block_copy import BlockCopy, BlockCopyError, cluster_size_for

if TYPE_CHECKING:
    from blockd.block.node import BlockNode

log = logging.getLogger(__name__)

#: Bytes per copy under a speed limit: QEMU's STREAM_CHUNK, so progress and throttling move in
#: the same steps as qemu-storage-daemon's.
STREAM_CHUNK = 512 * 1024
#: Bytes per copy and copies in flight otherwise. Every copy allocates in the device, so a few
#: large ones in order keep its file written nearly sequentially; eight 4 MiB copies (what a
#: backup uses) interleave allocations and measured slower.
UNLIMITED_CHUNK = 8 * 1024 * 1024
WORKERS = 2

#: ``await populate(offset, nbytes, zero)``: copy the range up (the filter's prefetch read).
Populate = Callable[[int, int, bool], Awaitable[None]]


class StreamCopy(BlockCopy):
    """Copy state of one stream (QEMU's stream_run loop over block-copy's bookkeeping).

    *base* is the first image that is **not** copied from (None: the whole chain).
    *on_ignored*, when set, takes a failed copy's errno and returns True to go on past it
    (``on-error=ignore``); the range then counts as done, as in QEMU.
    """

    def __init__(
        self,
        node: BlockNode,
        base: BlockNode | None,
        populate: Populate,
        on_ignored: Callable[[int], bool] | None = None,
    ) -> None:
        super().__init__(node, node, cluster_size=cluster_size_for(node))
        self.base = base
        self.populate = populate
        self.on_ignored = on_ignored

    async def _classify(self, offset: int, nbytes: int) -> tuple[str, int]:
        ext = await self.source.block_status_above(offset, nbytes, self.base)
        if ext.flags & BlockStatus.EOF:
            return "skip", nbytes
        if not ext.flags & BlockStatus.ALLOCATED or ext.depth == 0:
            return "skip", ext.length  # only in the base, or the node has it already
        return ("zero" if ext.flags & BlockStatus.ZERO else "data"), ext.length

    def _chunk(self, limited: bool) -> int:
        size = STREAM_CHUNK if limited else UNLIMITED_CHUNK
        return max(size - size % self.cluster_size, self.cluster_size)

    async def _copy_range(self, offset: int, nbytes: int, zero: bool) -> None:
        try:
            await self.populate(offset, nbytes, zero)
        except OSError as exc:
            err = exc.errno or errno.EIO
            log.debug("stream copy %s+%s failed: %s", offset, nbytes, exc)
            if self.on_ignored is None or not self.on_ignored(err):
                raise BlockCopyError(err, True) from exc
        self.on_progress(nbytes)
