"""NBD server and block export commands: nbd-server-start/stop, block-export-add/del,
query-block-exports and the deprecated nbd-server-add/remove (QEMU's blockdev-nbd.c and
block/export/export.c), with QSD 7.2's texts and event ordering.

Event order (observed on QSD): deleting an export nobody uses emits ``BLOCK_EXPORT_DELETED``
before the reply; ``mode=hard`` with clients connected replies first and emits the event once
the connections are gone; ``nbd-server-stop`` waits for everything and emits before its reply.
"""

from __future__ import annotations

import logging
from typing import Any

from blockd.bitmap.dirty import ALLOW_RO, DirtyBitmap, find_bitmap
from blockd.block.graph import check_id
from blockd.block.node import BlockNode, BlockUser
from blockd.block.perm import Perm
from blockd.errors import QmpError
from blockd.nbd import protocol as P
from blockd.nbd.export import NbdExport
from blockd.nbd.service import NbdService
from blockd.qapi.export import (
    BlockDirtyBitmap,
    BlockExportDelArgs,
    BlockExportDeletedEvent,
    BlockExportInfo,
    BlockExportOptions,
    BlockExportRemoveMode,
    NbdServerAddArgs,
    NbdServerRemoveArgs,
    NbdServerStartArgs,
)
from blockd.qmp.registry import Context, command, event

log = logging.getLogger(__name__)

event("BLOCK_EXPORT_DELETED", BlockExportDeletedEvent)


def service(ctx: Context) -> NbdService:
    """The daemon's NBD state, created on first use with its shutdown hook."""
    daemon = ctx.daemon
    svc = daemon.services.get("nbd")
    if svc is None:
        svc = NbdService(daemon.emit)
        daemon.services["nbd"] = svc
        daemon.shutdown_hooks.append(svc.shutdown)
    assert isinstance(svc, NbdService)
    return svc


@command("nbd-server-start", NbdServerStartArgs)
async def qmp_nbd_server_start(ctx: Context, args: NbdServerStartArgs) -> None:
    svc = service(ctx)
    if svc.server is not None:
        raise QmpError("NBD server already running")
    if args.tls_creds is not None:
        # No object-add in blockd, so no credentials object can exist: QSD's own text, with
        # the reason spelled out.
        raise QmpError(
            f"No TLS credentials with id '{args.tls_creds}' (blockd does not support NBD over TLS)"
        )
    if args.tls_authz is not None:
        log.warning("nbd-server-start: tls-authz without tls-creds is ignored (as QSD does)")
    max_conn = 100 if args.max_connections is None else args.max_connections
    await svc.start_server(args.addr, max_conn)


@command("nbd-server-stop")
async def qmp_nbd_server_stop(ctx: Context, args: Any) -> None:
    svc = service(ctx)
    if svc.server is None:
        raise QmpError("NBD server not running")
    await svc.stop_server()


def _resolve_bitmaps(
    ctx: Context, node: BlockNode, specs: list[Any], writable: bool
) -> list[DirtyBitmap]:
    """Bitmap specs → bitmap objects, QEMU's lookup rules and texts.

    A plain name is searched on the export node and down its filter/backing chain; the
    ``{node, name}`` form names the node. Each is checked not busy (marking it busy as we go,
    so a bitmap named twice is refused the second time); on failure the marks are undone.
    """
    out: list[DirtyBitmap] = []
    try:
        for spec in specs:
            bm: DirtyBitmap | None = None
            if isinstance(spec, BlockDirtyBitmap):
                bnode = ctx.daemon.graph.find(spec.node)
                if bnode is None:
                    raise QmpError(f"Node '{spec.node}' not found")
                bm = find_bitmap(bnode, spec.name)
                if bm is None:
                    raise QmpError(f"Dirty bitmap '{spec.name}' not found")
            else:
                cur: BlockNode | None = node
                while cur is not None and bm is None:
                    bm = find_bitmap(cur, spec)
                    cur = cur.filtered_child() or cur.backing
                if bm is None:
                    raise QmpError(f"Bitmap '{spec}' is not found")
            if not writable and not node.read_only and bm.is_recording():
                raise QmpError(f"Enabled bitmap '{bm.name}' incompatible with readonly export")
            bm.check(ALLOW_RO)
            bm.busy = True
            out.append(bm)
        return out
    except BaseException:
        _unbusy(out)
        raise


def _unbusy(bitmaps: list[DirtyBitmap]) -> None:
    for bm in bitmaps:
        bm.busy = False


async def add_export(
    ctx: Context,
    *,
    export_id: str,
    node_name: str,
    name: str | None,
    description: str | None,
    writable: bool,
    writethrough: bool,
    bitmaps: list[Any],
    allocation_depth: bool,
    iothread: str | None,
) -> NbdExport:
    """block_exp_add + nbd_export_create, checks in QEMU's order."""
    svc = service(ctx)
    try:
        check_id(export_id)
    except QmpError:
        raise QmpError("Invalid block export id") from None
    if export_id in svc.exports:
        raise QmpError(f"Block export id '{export_id}' is already in use")
    node = ctx.daemon.graph.lookup(node_name)
    if iothread is not None:
        raise QmpError(f'iothread "{iothread}" not found')
    if writable and node.read_only:
        raise QmpError("Cannot export read-only node as writable")
    # QEMU's blk_exp_add takes the node before the NBD checks (so a permission conflict is
    # reported first), then nbd_export_create forbids resizing while the export exists.
    perm = Perm.CONSISTENT_READ | (Perm.WRITE if writable else Perm(0))
    taker = BlockUser("an unnamed block device")
    edge = taker.attach(node, perm, Perm.all())
    found: list[DirtyBitmap] = []
    try:
        server = svc.server
        if server is None:
            raise QmpError("NBD server not running")
        if name is None:
            name = node_name
        if len(name.encode()) > P.MAX_STRING_SIZE:
            raise QmpError(f"export name '{name}' too long")
        if description is not None and len(description.encode()) > P.MAX_STRING_SIZE:
            raise QmpError(f"description '{description}' too long")
        if svc.export_by_name(name) is not None:
            raise QmpError(f"NBD server already has export named '{name}'")
        taker.set_perm(edge, perm, Perm.all() & ~Perm.RESIZE)
        found = _resolve_bitmaps(ctx, node, bitmaps, writable)
        export = NbdExport(
            export_id,
            name,
            edge,
            description=description,
            writable=writable,
            writethrough=writethrough,
            bitmaps=found,
            allocation_depth=allocation_depth,
            multi_conn=server.max_connections != 1,
        )
    except BaseException:
        _unbusy(found)
        if edge.parent is taker:
            taker.detach_sync(edge)
        raise
    svc.exports[export_id] = export
    log.info("nbd: export %s (name '%s') on node %s", export_id, name, node.node_name)
    return export


@command("block-export-add", BlockExportOptions)
async def qmp_block_export_add(ctx: Context, args: Any) -> None:
    await add_export(
        ctx,
        export_id=args.id,
        node_name=args.node_name,
        name=args.name,
        description=args.description,
        writable=bool(args.writable),
        writethrough=bool(args.writethrough),
        bitmaps=list(args.bitmaps or []),
        allocation_depth=bool(args.allocation_depth),
        iothread=args.iothread,
    )


@command("nbd-server-add", NbdServerAddArgs, features=("deprecated",))
async def qmp_nbd_server_add(ctx: Context, args: NbdServerAddArgs) -> None:
    """The export id is the export name; a read-only node silently gets a read-only export."""
    node = ctx.daemon.graph.lookup(args.device, args.device)
    writable = bool(args.writable) and not node.read_only
    name = args.name if args.name is not None else args.device
    await add_export(
        ctx,
        export_id=name,
        node_name=args.device,
        name=name,
        description=args.description,
        writable=writable,
        writethrough=False,
        bitmaps=[args.bitmap] if args.bitmap is not None else [],
        allocation_depth=False,
        iothread=None,
    )


async def _delete(ctx: Context, export_id: str, mode: BlockExportRemoveMode | None) -> None:
    svc = service(ctx)
    export = svc.exports.get(export_id)
    if export is None:
        raise QmpError(f"Export '{export_id}' is not found")
    if export.shutting_down:
        # Its deletion is under way (clients still disconnecting): a second one would race
        # the first to release the export.
        raise QmpError(f"Export '{export_id}' is already shutting down")
    if (mode or BlockExportRemoveMode.SAFE) is BlockExportRemoveMode.SAFE and export.connections:
        raise QmpError(f"export '{export_id}' still in use")
    await svc.delete(export)


@command("block-export-del", BlockExportDelArgs)
async def qmp_block_export_del(ctx: Context, args: BlockExportDelArgs) -> None:
    await _delete(ctx, args.id, args.mode)


@command("nbd-server-remove", NbdServerRemoveArgs, features=("deprecated",))
async def qmp_nbd_server_remove(ctx: Context, args: NbdServerRemoveArgs) -> None:
    """``name`` is the export *id* (QSD 7.2 behaviour)."""
    await _delete(ctx, args.name, args.mode)


@command("query-block-exports", returns=list[BlockExportInfo])
async def qmp_query_block_exports(ctx: Context, args: Any) -> list[dict[str, Any]]:
    svc = service(ctx)
    return [e.info() for e in reversed(svc.exports.values())]
