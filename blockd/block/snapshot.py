"""External snapshots: ``blockdev-snapshot-sync`` and ``blockdev-snapshot`` as transaction
actions (QEMU's blockdev.c external_snapshot_*).

prepare() creates or opens the overlay and checks everything that can fail; commit() installs
the old node as the overlay's backing, moves every parent of the old node to the overlay and
reopens the old node read-only; abort() drops the overlay. The same class serves the stand-alone
commands and the ``transaction`` actions.

Unlike qemu-storage-daemon, which frees an overlay that nothing uses right after creating it,
blockd keeps the overlay as a monitor-owned node, so a chain can be built in qmp-shell without an
export (see docs/compatibility.md).
"""

from __future__ import annotations

from typing import Any

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.block.perm import ChildRole, Perm, perm_update, refresh
from blockd.errors import QmpError
from blockd.qapi.base import ArgsValidator
from blockd.qapi.block import BlockdevCreateOptions, BlockdevOptions

_OPTS = ArgsValidator(BlockdevOptions)
_CREATE = ArgsValidator(BlockdevCreateOptions)


async def reopen_read_only(node: BlockNode, read_only: bool) -> None:
    """Switch a node and its data children (not its backing) between ro and rw, then update
    the permissions of the whole subtree once (QEMU's bdrv_reopen_multiple): the file below a
    qcow2 cannot become read-only on its own while the qcow2 above still writes it.

    Going read-only, parents go first (a qcow2 stores its bitmaps while its file is still
    writable); going read-write, children go first. If the permission update fails, every
    node is reopened back.
    """
    nodes: list[BlockNode] = []

    def collect(n: BlockNode) -> None:
        if n in nodes or n.read_only == read_only:
            return
        nodes.append(n)
        for edge in n.children.values():
            if not edge.role & ChildRole.COW:
                collect(edge.node)

    collect(node)
    if not nodes:
        return
    if read_only:
        # A writer from outside the nodes being switched keeps them read-write (QEMU's
        # check in bdrv_node_refresh_perm, with its text naming the node).
        for n in nodes:
            outside = Perm(0)
            for edge in n.parents:
                if edge.parent not in nodes:
                    outside |= edge.perm
            if outside & (Perm.WRITE | Perm.WRITE_UNCHANGED):
                raise QmpError(
                    f"Read-only block node '{n.node_name}' cannot support read-write users"
                )
    order = nodes if read_only else list(reversed(nodes))
    done: list[BlockNode] = []
    try:
        if read_only:
            await node.flush()
        for n in order:
            await n.driver.reopen(read_only)
            n.read_only = read_only
            done.append(n)
        with perm_update() as upd:
            refresh([node], upd)
    except BaseException:
        for n in reversed(done):
            try:
                await n.driver.reopen(not read_only)
                n.read_only = not read_only
            except Exception:  # pragma: no cover - best effort; the first error is what counts
                pass
        raise


async def create_qcow2_overlay(
    graph: BlockGraph, path: str, size: int, backing_file: str | None, backing_fmt: str | None
) -> None:
    """Create a qcow2 image at *path* as ``qemu-img create -f qcow2 -b … -F …`` would."""
    from blockd.block.driver import driver_class

    file_cls = driver_class("file")
    assert file_cls is not None
    await file_cls.create(_CREATE.validate({"driver": "file", "filename": path, "size": 0}), graph)
    tmp = await graph.open_node(_OPTS.validate({"driver": "file", "filename": path}))
    try:
        opts: dict[str, Any] = {"driver": "qcow2", "file": tmp.node_name, "size": size}
        if backing_file:
            opts["backing-file"] = backing_file
            if backing_fmt:
                opts["backing-fmt"] = backing_fmt
        qcow2 = driver_class("qcow2")
        if qcow2 is None or not qcow2.can_create:
            raise QmpError("Driver does not support blockdev-create")
        await qcow2.create(_CREATE.validate(opts), graph)
    finally:
        await graph.maybe_free(tmp)


class ExternalSnapshot:
    """One external snapshot; used by the commands and by ``transaction``."""

    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph
        self.old: BlockNode | None = None
        self.new: BlockNode | None = None
        self._committed = False
        self._existing = False
        self._old_read_only = False
        self._new_was_owned = False

    # -- prepare -------------------------------------------------------------------------
    async def prepare_sync(
        self,
        *,
        device: str | None,
        node_name: str | None,
        snapshot_file: str,
        snapshot_node_name: str | None,
        fmt: str,
        mode: str,
    ) -> None:
        key = node_name if node_name is not None else device
        old = self.graph.find(key or "")
        if old is None:
            raise QmpError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")
        if node_name is not None and snapshot_node_name is None:
            raise QmpError("New overlay node-name missing")
        if snapshot_node_name is not None and self.graph.find(snapshot_node_name) is not None:
            raise QmpError("New overlay node-name already in use")
        if fmt != "qcow2":
            if fmt in ("raw", "file", "null-co", "blkdebug", "nbd"):
                raise QmpError(f"Backing file not supported for file format '{fmt}'")
            raise QmpError(f"Unknown driver '{fmt}'")
        self._check_old(old)
        if mode == "absolute-paths":
            backing_name = old.filename
            if backing_name.startswith("json:"):
                raise QmpError(
                    "Cannot use relative backing file names for 'json:' images; "
                    "the snapshot needs a backing file name"
                )
            await create_qcow2_overlay(self.graph, snapshot_file, old.length, backing_name, old.drv)
        opts: dict[str, Any] = {
            "driver": fmt,
            "file": {"driver": "file", "filename": snapshot_file},
            "backing": None,
        }
        if snapshot_node_name is not None:
            opts["node-name"] = snapshot_node_name
        new = await self.graph.open_node(_OPTS.validate(opts))
        self.old, self.new = old, new

    def prepare_existing(self, node: str, overlay: str) -> None:
        old = self.graph.lookup(node)
        new = self.graph.lookup(overlay)
        # QEMU's order: the old node's blockers, the overlay's state, then the cycle check.
        self._check_old(old)
        if new.backing is not None:
            raise QmpError("The overlay already has a backing image")
        if old is new or old in new.backing_chain() or new in old.backing_chain():
            raise QmpError(f"Making '{node}' a backing child of '{overlay}' would create a cycle")
        if not new.driver.supports_backing:
            raise QmpError("The overlay does not support backing images")
        if any(not isinstance(e.parent, BlockNode) for e in new.parents):
            raise QmpError("The overlay is already in use")
        self.old, self.new = old, new
        self._existing = True

    def _check_old(self, old: BlockNode) -> None:
        old.check_not_busy()
        old.check_not_backing()

    # -- commit / abort ------------------------------------------------------------------
    async def commit(self) -> None:
        old, new = self.old, self.new
        assert old is not None and new is not None
        self._old_read_only = old.read_only
        self._new_was_owned = new.monitor_owned
        async with self.graph.drained(old, new):
            self.graph.attach(new, old, "backing", ChildRole.backing())
            _backing_changed(new, old)
            self.graph.replace(old, new)
            new.monitor_owned = True
            await reopen_read_only(old, True)
        self._committed = True

    async def revert(self) -> None:
        """Undo a committed snapshot (a later action of its transaction failed)."""
        if not self._committed:
            await self.abort()
            return
        old, new = self.old, self.new
        assert old is not None and new is not None
        async with self.graph.drained(old, new):
            self.graph.replace(new, old)
            edge = new.children.get("backing")
            if edge is not None:
                await self.graph.detach(edge)
            _backing_changed(new, None)
            await reopen_read_only(old, self._old_read_only)
        self._committed = False
        new.monitor_owned = self._new_was_owned
        if not self._existing:
            await self.graph.maybe_free(new)

    async def abort(self) -> None:
        if self.new is not None and not self._committed and not self._existing:
            await self.graph.maybe_free(self.new)


def _backing_changed(node: BlockNode, backing: BlockNode | None) -> None:
    """Tell a driver that wants to know (qcow2 records the backing file) about its new
    backing node, or that it has none any more."""
    node.driver.on_backing_attached(backing)
