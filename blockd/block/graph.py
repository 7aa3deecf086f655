"""The block graph: named nodes, opening from options, edges, deletion, replacement
(QEMU's block.c: bdrv_open, bdrv_attach_child, bdrv_replace_node, blockdev-del).

Nodes are kept in creation order; ``query-named-block-nodes`` lists them newest first as
QEMU does. Implicit nodes (inline children without a name) get ``#blockNNN`` names and live only
as long as something refers to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import AsyncIterator
from typing import Any

from blockd.block.driver import BlockDriver, driver_class
from blockd.block.node import BdrvChild, BlockNode, BlockUser, inside_graph, leave_graph
from blockd.block.perm import ChildRole, PermUpdate, perm_update, refresh, release_perms
from blockd.errors import QmpError

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")
MAX_NAME = 31


def check_id(name: str, what: str = "node-name") -> None:
    """QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'."""
    if not _NAME_RE.match(name):
        raise QmpError(f"Invalid {what}: '{name}'")


class BlockGraph:
    def __init__(self) -> None:
        self.nodes: dict[str, BlockNode] = {}
        self._counter = 0

    # -- names and lookup ------------------------------------------------------------------
    def gen_name(self) -> str:
        """``#block`` + a per-process counter + two random digits, as QEMU's id_generate()."""
        while True:
            name = f"#block{self._counter}{random.randrange(100):02d}"
            self._counter += 1
            if name not in self.nodes:
                return name

    def find(self, name: str) -> BlockNode | None:
        return self.nodes.get(name)

    def lookup(self, name: str | None, device: str | None = None) -> BlockNode:
        """Find by node name (QSD has no device names); QEMU's "Cannot find" text."""
        key = name if name is not None else device
        node = self.nodes.get(key or "")
        if node is None:
            raise QmpError(f"Cannot find device='{device or ''}' nor node-name='{name or ''}'")
        return node

    def newest_first(self) -> list[BlockNode]:
        return list(reversed(self.nodes.values()))

    # -- opening ---------------------------------------------------------------------------
    async def add(self, options: Any) -> BlockNode:
        """``blockdev-add``: open a monitor-owned node and its inline children."""
        if getattr(options, "node_name", None) is None:
            raise QmpError("'node-name' must be specified for the root node")
        node = await self.open_node(options)
        node.monitor_owned = True
        return node

    async def open_node(
        self,
        options: Any,
        inherit_read_only: bool | None = None,
        inherit_from: BlockNode | None = None,
    ) -> BlockNode:
        """Open a node; *inherit_from* is the parent of an inline data child, whose
        ``discard`` and ``cache`` settings apply where the child sets none (QEMU's
        bdrv_inherited_options)."""
        name = options.node_name
        if name is not None:
            check_id(name)
            if len(name) > MAX_NAME:
                raise QmpError("Node name too long")
            if name in self.nodes:
                raise QmpError(f"Duplicate nodes with node-name='{name}'")
        cls = driver_class(
            options.driver if isinstance(options.driver, str) else options.driver.value
        )
        if cls is None:
            raise QmpError(f"Unknown driver '{options.driver}'")
        implicit = name is None
        node = BlockNode(self, name or self.gen_name(), cls)
        node.implicit = implicit
        ro = options.read_only
        node.read_only = bool(ro) if ro is not None else bool(inherit_read_only)
        node.auto_read_only = bool(options.auto_read_only)
        node.force_share = bool(options.force_share)
        if node.force_share and not node.read_only:
            raise QmpError("force-share=on can only be used with read-only images")
        dz = options.detect_zeroes
        node.detect_zeroes = str(dz.value if dz is not None else "off")
        disc = options.discard
        if disc is not None:
            node.discard_mode = str(disc.value)
        elif inherit_from is not None:
            node.discard_mode = inherit_from.discard_mode
        if node.detect_zeroes == "unmap" and node.discard_mode != "unmap":
            raise QmpError(
                "setting detect-zeroes to unmap is not allowed without setting discard "
                "operation to unmap"
            )
        if inherit_from is not None:
            node.cache_direct = inherit_from.cache_direct
            node.cache_no_flush = inherit_from.cache_no_flush
        if options.cache is not None:
            if options.cache.direct is not None:
                node.cache_direct = options.cache.direct
            if options.cache.no_flush is not None:
                node.cache_no_flush = options.cache.no_flush
        node.options = options.wire()
        try:
            await node.driver.open(options, self)
        except BaseException:
            await self._close_children(node)
            try:
                await node.driver.close()
            except Exception:  # pragma: no cover - best effort after a failed open
                log.debug("close after failed open of %s", node.node_name, exc_info=True)
            raise
        self.nodes[node.node_name] = node
        log.info("opened node %s (%s)", node.node_name, node.drv)
        return node

    async def open_child(
        self,
        parent: BlockNode,
        ref: Any,
        name: str,
        role: ChildRole,
        *,
        inherit_read_only: bool | None = None,
    ) -> BdrvChild:
        """Attach a child from a BlockdevRef: an existing node's name or inline options."""
        owned = not isinstance(ref, str)
        if not owned:
            node = self.nodes.get(ref)
            if node is None:
                raise QmpError(f"Cannot find device='{ref}' nor node-name='{ref}'")
        else:
            ro = parent.read_only if inherit_read_only is None else inherit_read_only
            data_child = not role & ChildRole.COW  # backing files inherit none of this
            node = await self.open_node(
                ref, inherit_read_only=ro, inherit_from=parent if data_child else None
            )
        try:
            return self.attach(parent, node, name, role, owned=owned)
        except BaseException:
            if owned:
                await self.maybe_free(node)
            raise

    def attach(
        self,
        parent: BlockNode,
        node: BlockNode,
        name: str,
        role: ChildRole,
        owned: bool = False,
        update: PermUpdate | None = None,
    ) -> BdrvChild:
        """Make *node* the *name* child of *parent*; **raises** QmpError (and changes
        nothing) on a cycle or a permission conflict anywhere below."""
        if node is parent or parent in _all_descendants(node):
            raise QmpError(
                f"Making '{node.node_name}' a {name} child of '{parent.node_name}' would "
                "create a cycle"
            )
        perm, shared = parent.driver.child_perm(role, *parent.cumulative_perms())
        edge = BdrvChild(name, role, parent, node, perm, shared, owned)
        with perm_update(update) as upd:
            node.parents.append(edge)
            parent.children[name] = edge

            def undo() -> None:
                node.parents.remove(edge)
                del parent.children[name]

            upd.undo.append(undo)
            refresh([node], upd)
        return edge

    def check_chain_not_frozen(self, top: BlockNode, base: BlockNode | None) -> None:
        """No backing or filter link from *top* down to *base* may be frozen (QEMU's
        bdrv_is_backing_chain_frozen, with its text)."""
        cur: BlockNode | None = top
        while cur is not None and cur is not base:
            edge = _filter_or_cow_child(cur)
            if edge is None:
                return
            if edge.frozen:
                raise QmpError(
                    f"Cannot change '{edge.name}' link from '{cur.node_name}' to "
                    f"'{edge.node.node_name}'"
                )
            cur = edge.node

    def freeze_chain(self, top: BlockNode, base: BlockNode | None, frozen: bool) -> None:
        """Freeze (or thaw) the backing and filter links from *top* down to *base*: what a
        stream or commit works on cannot be changed under it (QEMU's
        bdrv_freeze_backing_chain). Checks first, so freezing is all or nothing."""
        if frozen:
            self.check_chain_not_frozen(top, base)
        cur: BlockNode | None = top
        while cur is not None and cur is not base:
            edge = _filter_or_cow_child(cur)
            if edge is None:
                return
            edge.frozen = frozen
            cur = edge.node

    async def detach(self, edge: BdrvChild) -> None:
        if edge.frozen:
            raise QmpError(
                f"Cannot change frozen '{edge.name}' link from '{_parent_name(edge)}' to "
                f"'{edge.node.node_name}'"
            )
        parent = edge.parent
        if isinstance(parent, BlockNode) and parent.children.get(edge.name) is edge:
            del parent.children[edge.name]
        node = edge.node
        if edge in node.parents:
            node.parents.remove(edge)
            release_perms(node)
        if edge.owned:
            await self.maybe_free(node)

    async def _close_children(self, node: BlockNode) -> None:
        for edge in list(node.children.values()):
            await self.detach(edge)

    async def maybe_free(self, node: BlockNode) -> None:
        """Close *node* once nothing refers to it (no parents, no monitor reference)."""
        if node.parents or node.monitor_owned or node.closed:
            return
        if self.nodes.get(node.node_name) is node:
            del self.nodes[node.node_name]
        try:
            await node.close()
        except Exception as exc:
            # The node is gone either way (as in QEMU, whose close cannot fail): an error
            # reply would make a client believe it still exists.
            log.error("closing %s failed: %s", node.node_name, exc)
        finally:
            await self._close_children(node)
        log.info("closed node %s", node.node_name)

    # -- deletion ----------------------------------------------------------------------------
    async def delete(self, name: str) -> None:
        """``blockdev-del``."""
        node = self.nodes.get(name)
        if node is None:
            raise QmpError(f"Failed to find node with node-name='{name}'")
        # QEMU's order: a user that is not a node, op blockers, ownership, other parents.
        if any(e.backend for e in node.parents):
            raise QmpError(f"Node {name} is in use")
        node.check_not_busy()
        node.check_not_backing()
        if not node.monitor_owned:
            raise QmpError(f"Node {name} is not owned by the monitor")
        if node.parents:
            raise QmpError(f"Block device {name} is in use")
        # Before anything is torn down: if the bitmaps cannot be written, the node stays
        # (with them) and the user is told, instead of losing them on close.
        await node.driver.store_dirty_bitmaps()
        node.monitor_owned = False
        await self.maybe_free(node)

    # -- graph changes ---------------------------------------------------------------------
    def replace(
        self,
        old: BlockNode,
        new: BlockNode,
        keep: set[BdrvChild] | None = None,
        update: PermUpdate | None = None,
    ) -> None:
        """Move every parent edge of *old* to *new* (QEMU's bdrv_replace_node): the heart of
        snapshots, pivots and filter insertion. Edges in *keep*, and edges whose parent
        *new* reaches (moving them would make a cycle), stay. All or nothing: a permission
        conflict or a frozen edge leaves every edge as it was.

        **Concurrency:** callers quiesce both nodes first so no request sees a half-moved
        graph.
        """
        keep = keep or set()
        below_new = _all_descendants(new) | {new}
        moving = [e for e in old.parents if e not in keep and e.parent not in below_new]
        for edge in moving:
            if edge.frozen:
                raise QmpError(f"Cannot change '{edge.name}' link to '{old.node_name}'")
        old_parents, new_parents = list(old.parents), list(new.parents)
        with perm_update(update) as upd:
            for edge in moving:
                old.parents.remove(edge)
                edge.node = new
                new.parents.append(edge)

            def undo() -> None:
                for edge in moving:
                    edge.node = old
                old.parents[:] = old_parents
                new.parents[:] = new_parents

            upd.undo.append(undo)
            refresh([new, old], upd)
        for edge in moving:
            parent = edge.parent
            if isinstance(parent, BlockNode):
                parent.driver.on_child_replaced(edge)
            elif isinstance(parent, BlockUser):
                parent.on_node_replaced(edge, old, new)

    # -- quiescing -----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def drained(self, *nodes: BlockNode) -> AsyncIterator[None]:
        """A section in which no new request from outside reaches *nodes* (QEMU's
        bdrv_drained_begin/end): requests entering at the nodes or anywhere above them
        (exports, jobs) wait at the node where they enter, and the section begins once the
        requests in flight at that moment have finished. Requests that arrive meanwhile are
        not waited for, so steady I/O cannot starve the caller. The caller's own requests
        (a flush, a reopen writing metadata) pass.

        Every graph change that moves edges under running I/O (snapshot, pivot, reopen,
        block_resize, backing change) runs inside one.
        """
        closure = await self.quiesce_begin(*nodes)
        token = inside_graph()
        try:
            yield
        finally:
            leave_graph(token)
            self.quiesce_end(closure)

    async def quiesce_begin(self, *nodes: BlockNode) -> list[BlockNode]:
        """The first half of :meth:`drained`, for a section that a job opens in one step and
        closes in another (a mirror holds its source quiesced from the moment it found it
        in sync until the pivot is done). Returns what :meth:`quiesce_end` takes."""
        closure: list[BlockNode] = []
        todo = list(nodes)
        while todo:
            n = todo.pop()
            if n in closure:
                continue
            closure.append(n)
            todo.extend(e.parent for e in n.parents if isinstance(e.parent, BlockNode))
        for n in closure:
            n.begin_quiesce()
        try:
            for ev in [ev for n in closure for ev in n.in_flight_events()]:
                await ev.wait()
        except BaseException:
            self.quiesce_end(closure)
            raise
        return closure

    def quiesce_end(self, closure: list[BlockNode]) -> None:
        for n in closure:
            n.end_quiesce()

    # -- filters -------------------------------------------------------------------------
    def new_filter(self, cls: type[BlockDriver], name: str | None) -> BlockNode:
        """A filter node, not yet in the graph: the caller configures its driver, then
        :meth:`insert_filter` puts it in."""
        if name is not None:
            check_id(name)
            if len(name) > MAX_NAME:
                raise QmpError("Node name too long")
            if name in self.nodes:
                raise QmpError(f"Duplicate nodes with node-name='{name}'")
        node = BlockNode(self, name or self.gen_name(), cls)
        node.implicit = name is None
        return node

    def insert_filter(
        self,
        node: BlockNode,
        below: BlockNode,
        extra_children: tuple[tuple[str, BlockNode, ChildRole], ...] = (),
        update: PermUpdate | None = None,
    ) -> None:
        """Put filter *node* above *below* (QEMU's bdrv_insert_node): its ``file`` child is
        *below*, then every parent of *below* moves to it. All or nothing."""
        from blockd.block.drivers.filter import FilterDriver

        assert isinstance(node.driver, FilterDriver)
        node.read_only = below.read_only
        with perm_update(update) as upd:
            self.nodes[node.node_name] = node
            upd.undo.append(lambda: self._forget(node))
            try:
                own = self.attach(
                    node, below, node.driver.child_name, ChildRole.filtered(), update=upd
                )
                for name, child, role in extra_children:
                    self.attach(node, child, name, role, update=upd)
            except QmpError as exc:
                raise QmpError(f"Could not create node: {exc.desc}") from None
            try:
                self.replace(below, node, keep={own}, update=upd)
            except QmpError as exc:
                raise QmpError(f"Could not replace node: {exc.desc}") from None
        node.driver.on_inserted()
        log.info("inserted filter %s (%s) above %s", node.node_name, node.drv, below.node_name)

    def _forget(self, node: BlockNode) -> None:
        self.nodes.pop(node.node_name, None)

    def remove_filter(self, node: BlockNode) -> None:
        """Take filter *node* out again: its parents move back to its child, its edges go.
        Synchronous, so no request can slip between the two."""
        child = node.filtered_child()
        if child is None or self.nodes.get(node.node_name) is not node:
            return
        with perm_update() as upd:
            self.replace(node, child, update=upd)
        for edge in list(node.children.values()):
            del node.children[edge.name]
            if edge in edge.node.parents:
                edge.node.parents.remove(edge)
                release_perms(edge.node)
        del self.nodes[node.node_name]
        node.closed = True
        log.info("removed filter %s above %s", node.node_name, child.node_name)

    async def close_all(self, timeout: float | None = None) -> None:
        """Daemon shutdown: flush and close every node, parents before children; a node
        whose close takes longer than *timeout* (a server that stopped answering) is given up
        on so that the others still store their bitmaps."""
        for node in self.newest_first():
            try:
                await asyncio.wait_for(node.close(), timeout)
            except TimeoutError:
                log.error("closing %s did not end in %.0f s; giving up", node.node_name, timeout)
            except Exception as exc:
                log.error("closing %s failed: %s", node.node_name, exc)
        self.nodes.clear()


def _filter_or_cow_child(node: BlockNode) -> BdrvChild | None:
    """The edge a chain walk follows from *node*: its filtered child, else its backing."""
    if node.driver.is_filter:
        for edge in node.children.values():
            if edge.role & ChildRole.FILTERED:
                return edge
    return node.children.get("backing")


def _parent_name(edge: BdrvChild) -> str:
    parent = edge.parent
    return parent.node_name if isinstance(parent, BlockNode) else parent.parent_desc()


def _all_descendants(node: BlockNode) -> set[BlockNode]:
    seen: set[BlockNode] = set()
    todo = [c.node for c in node.children.values()]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(c.node for c in n.children.values())
    return seen
