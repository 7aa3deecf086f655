"""A block export: one node shown to NBD clients under a name (QEMU's block/export/export.c
for the generic part and the export half of nbd/server.c).

The export is a *parent* of its node (a :class:`BlockUser`, QEMU's BlockBackend), so the node
cannot be deleted under it and a snapshot or a mirror pivot moves the export to the new active
layer. Every request therefore goes to ``self.edge.node``, looked up per request, never to a
node remembered at creation time.

Exported dirty bitmaps are :class:`~blockd.bitmap.dirty.DirtyBitmap` objects, marked busy by
the command that creates the export and released here on deletion.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from blockd.bitmap.dirty import DirtyBitmap
from blockd.block.node import BdrvChild, BlockNode, BlockUser
from blockd.block.status import BlockStatus
from blockd.nbd import protocol as P

if TYPE_CHECKING:
    from blockd.nbd.transmission import NbdConnection

log = logging.getLogger(__name__)


# -- the export ------------------------------------------------------------------------------
class NbdExport(BlockUser):
    """One ``block-export-add type=nbd`` (or ``nbd-server-add``) export.

    **Lifecycle:** created attached and listed; ``request_shutdown`` hides it from new clients
    and closes the connected ones; once the last connection is gone it is *deleted*: detached
    from the node, its bitmaps freed, ``BLOCK_EXPORT_DELETED`` emitted by the owner.
    """

    def __init__(
        self,
        export_id: str,
        name: str,
        edge: BdrvChild,
        *,
        description: str | None,
        writable: bool,
        writethrough: bool,
        bitmaps: list[DirtyBitmap],
        allocation_depth: bool,
        multi_conn: bool,
    ) -> None:
        # QEMU's export BlockBackends have no name: conflicts call them this.
        super().__init__("an unnamed block device")
        self.id = export_id
        self.name = name
        self.description = description
        self.writable = writable
        self.writethrough = writethrough
        #: Exported bitmaps, already marked busy by the caller; released on deletion.
        self.bitmaps = bitmaps
        self.allocation_depth = allocation_depth
        self.multi_conn = multi_conn
        self.connections: set[NbdConnection] = set()
        self.shutting_down = False
        self.deleted = asyncio.Event()
        self.adopt(edge)
        self.edge: BdrvChild = edge
        #: The size clients see, fixed when the export is created as QEMU does.
        self.size = edge.node.length

    @property
    def node(self) -> BlockNode:
        """The node requests go to now (follows snapshots and pivots)."""
        return self.edge.node

    def on_node_replaced(self, edge: BdrvChild, old: BlockNode, new: BlockNode) -> None:
        log.info("export %s now on node %s (was %s)", self.id, new.node_name, old.node_name)

    # -- what clients see ---------------------------------------------------------------------
    def transmission_flags(self, structured: bool) -> int:
        """Flags for NBD_INFO_EXPORT (QEMU's set, plus multi-conn for writable exports);
        *structured*: the client negotiated structured replies, so DF is offered.

        Multi-conn is safe for writable exports in blockd because every connection goes
        through the same node: a write completed on one connection is visible to reads on
        any other, and one FLUSH persists the node for all of them. It is withheld when the
        server allows a single connection (``max-connections=1``), as QEMU does.
        """
        flags = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_SEND_CACHE
        if self.writable:
            flags |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FAST_ZERO
        else:
            flags |= P.FLAG_READ_ONLY
        if self.multi_conn:
            flags |= P.FLAG_CAN_MULTI_CONN
        if structured:
            flags |= P.FLAG_SEND_DF
        return flags

    def contexts(self) -> list[str]:
        """Every metadata context this export offers, in context-id order."""
        out = [P.CONTEXT_BASE_ALLOCATION]
        if self.allocation_depth:
            out.append(P.CONTEXT_ALLOCATION_DEPTH)
        out.extend(P.CONTEXT_DIRTY_BITMAP_PREFIX + str(bm.name) for bm in self.bitmaps)
        return out

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "nbd",
            "node-name": self.node.node_name,
            "shutting-down": self.shutting_down,
        }

    # -- metadata -------------------------------------------------------------------------------
    async def context_extents(
        self, context: str, offset: int, length: int, max_extents: int
    ) -> list[tuple[int, int]]:
        """``(length, flags)`` descriptors of *context* from *offset*, adjacent equal flags
        merged, at most *max_extents* of them, never past ``offset + length``."""
        out: list[tuple[int, int]] = []
        end = offset + length

        def add(n: int, flags: int) -> bool:
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
                return True
            if len(out) >= max_extents:
                return False
            out.append((n, flags))
            return True

        if context.startswith(P.CONTEXT_DIRTY_BITMAP_PREFIX):
            name = context[len(P.CONTEXT_DIRTY_BITMAP_PREFIX) :]
            hb = next(b for b in self.bitmaps if b.name == name).hb
            pos = offset
            for start, n in hb.dirty_areas(offset, end):
                if start > pos and not add(start - pos, 0):
                    return out
                if not add(n, P.STATE_DIRTY):
                    return out
                pos = start + n
            if end > pos:
                add(end - pos, 0)
            return out
        pos = offset
        node = self.node
        while pos < end:
            ext = await node.block_status_above(pos, end - pos, None)
            if ext.length <= 0:
                break
            n = min(ext.length, end - pos)
            if context == P.CONTEXT_ALLOCATION_DEPTH:
                flags = ext.depth + 1 if ext.flags & BlockStatus.ALLOCATED else 0
            else:
                flags = (0 if ext.flags & BlockStatus.DATA else P.STATE_HOLE) | (
                    P.STATE_ZERO if ext.flags & BlockStatus.ZERO else 0
                )
            if not add(n, flags):
                break
            pos += n
        return out

    # -- removal --------------------------------------------------------------------------------
    def request_shutdown(self) -> None:
        """Hide from new clients and close every connection (hard removal)."""
        self.shutting_down = True
        for conn in list(self.connections):
            conn.close()

    async def release(self) -> None:
        """Detach from the node and free the bitmaps: the last step of deletion."""
        for bm in self.bitmaps:
            bm.busy = False
        await self.detach_all()
        self.deleted.set()
