"""blockdev-mirror and drive-mirror (QEMU's blockdev.c: qmp_blockdev_mirror, qmp_drive_mirror
and blockdev_mirror_common), with QEMU's checks in QEMU's order so that the first refusal is
QEMU's."""

from __future__ import annotations

from typing import Any

from blockd.block.driver import driver_class
from blockd.block.drivers.nbd import parse_nbd_uri
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.block.probe import probe_format
from blockd.errors import QmpError
from blockd.job.mirror import MirrorJob, MirrorParams, is_root, let_start, start_mirror
from blockd.qapi.base import ArgsValidator
from blockd.qapi.job import BlockdevOnError
from blockd.qapi.mirror import BlockdevMirror, DriveMirror
from blockd.qmp.registry import Context, command

MiB = 1024 * 1024


def root_node(graph: BlockGraph, name: str) -> BlockNode:
    """QEMU's qmp_get_root_bs: the node, which nothing but exports may use."""
    node = graph.lookup(name, name)
    if not is_root(node):
        raise QmpError("Need a root block node")
    return node


def nbd_target_options(target: str) -> dict[str, Any] | None:
    """The protocol options of a drive-mirror/drive-backup target given as an NBD URI or in
    QEMU's legacy ``nbd:`` forms, or None for a file name."""
    if not target.startswith(("nbd:", "nbd+unix:", "nbd+tcp:")):
        return None
    try:
        return parse_nbd_uri(target)
    except ValueError as exc:
        raise QmpError(f"Could not open '{target}': {exc}") from None


async def open_drive_target(
    graph: BlockGraph,
    target: str,
    fmt: str | None,
    node_name: str | None,
    extra: dict[str, Any],
) -> BlockNode:
    """Open a drive-* target by name: a local file or an NBD export, in *fmt* or the format
    its first bytes show, with its backing file left closed (the job gives it one)."""
    proto = nbd_target_options(target) or {"driver": "file", "filename": target}
    if fmt is None:
        fmt = await probe_format(graph, proto)
    cls = driver_class(fmt)
    if cls is None:
        raise QmpError(f"Unknown driver '{fmt}'")
    opts: dict[str, Any] = {"driver": fmt, **extra}
    if fmt in ("file", "nbd"):
        opts.update(proto)
    else:
        opts["file"] = proto
    if cls.supports_backing:
        opts["backing"] = None
    if node_name is not None:
        opts["node-name"] = node_name
    from blockd.qapi.block import BlockdevOptions

    return await graph.open_node(ArgsValidator(BlockdevOptions).validate(opts))


def check_granularity(g: int) -> None:
    if g and (g < 512 or g > 64 * MiB):
        raise QmpError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if g & (g - 1):
        raise QmpError("Parameter 'granularity' expects a power of 2")


def _can_replace(bs: BlockNode, node: BlockNode) -> bool:
    """QEMU's bdrv_recurse_can_replace: only the node itself or one reached through filters
    shows the same data as the mirror's source."""
    cur: BlockNode | None = bs
    while cur is not None:
        if cur is node:
            return True
        cur = cur.filtered_child() if cur.driver.is_filter else None
    return False


def _params(args: Any, sync: str, **kw: Any) -> MirrorParams:
    return MirrorParams(
        job_id=args.job_id or "",
        sync=sync,
        speed=args.speed or 0,
        granularity=args.granularity or 0,
        buf_size=args.buf_size or 0,
        on_source_error=args.on_source_error or BlockdevOnError.REPORT,
        on_target_error=args.on_target_error or BlockdevOnError.REPORT,
        copy_mode=args.copy_mode.value if args.copy_mode else "background",
        auto_finalize=args.auto_finalize is not False,
        auto_dismiss=args.auto_dismiss is not False,
        replaces=args.replaces,
        **kw,
    )


def mirror_common(ctx: Context, bs: BlockNode, target: BlockNode, p: MirrorParams) -> MirrorJob:
    """QEMU's blockdev_mirror_common, then mirror_start."""
    graph = ctx.daemon.graph
    check_granularity(p.granularity)
    bs.check_not_busy()
    target.check_not_busy()
    target.check_not_backing()
    if bs.cow_backing() is None and p.sync == "top":
        p.sync = "full"
    if p.replaces is not None:
        node = graph.find(p.replaces)
        if node is None:
            raise QmpError(f"Failed to find node with node-name='{p.replaces}'")
        node.check_not_busy()
        if not _can_replace(bs, node):
            raise QmpError(
                f"Cannot replace '{p.replaces}' by a node mirrored from '{bs.node_name}', "
                "because it cannot be guaranteed that doing so would not lead to an abrupt "
                "change of visible data"
            )
        if node.length != bs.length:
            raise QmpError("cannot replace image with a mirror image of different size")
    if p.sync in ("incremental", "bitmap"):
        raise QmpError(f"Sync mode '{p.sync}' not supported")
    base = bs.cow_backing() if p.sync == "top" else None
    owns = p.backing_mode != "leave"
    return start_mirror(ctx.daemon.jobs, graph, bs, target, p, base=base, owns_target=owns)


@command("blockdev-mirror", BlockdevMirror)
async def qmp_blockdev_mirror(ctx: Context, args: BlockdevMirror) -> None:
    graph = ctx.daemon.graph
    bs = root_node(graph, args.device)
    target = graph.lookup(args.target, args.target)
    sync = args.sync.value
    p = _params(args, sync, zero_target=sync == "full", filter_node_name=args.filter_node_name)
    await let_start(mirror_common(ctx, bs, target, p))


@command("drive-mirror", DriveMirror)
async def qmp_drive_mirror(ctx: Context, args: DriveMirror) -> None:
    from blockd.qmp.commands.transaction import _create_image

    graph = ctx.daemon.graph
    bs = root_node(graph, args.device)
    bs.check_not_busy()
    mode = args.mode.value if args.mode is not None else "absolute-paths"
    fmt = args.format if args.format is not None else None if mode == "existing" else bs.drv
    sync = args.sync.value
    backing = bs.cow_backing()
    if backing is None and sync == "top":
        sync = "full"
    if sync == "none":
        backing = bs
    if args.replaces is not None and args.node_name is None:
        raise QmpError("a node-name must be provided when replacing a named node of the graph")
    if mode != "existing":
        assert fmt is not None
        with_backing = backing if sync != "full" and backing is not None else None
        nbd = nbd_target_options(args.target)
        await _create_image(graph, args.target, fmt, bs.length, with_backing, nbd)
    extra = {"discard": bs.discard_mode} if bs.discard_mode == "unmap" else {}
    target = await open_drive_target(graph, args.target, fmt, args.node_name, extra)
    try:
        zero_target = sync == "full" and (mode == "existing" or not target.driver.has_zero_init())
        p = _params(
            args,
            sync,
            unmap=args.unmap is not False,
            backing_mode="source" if mode == "absolute-paths" else "open",
            zero_target=zero_target,
        )
        job = mirror_common(ctx, bs, target, p)
    except BaseException:
        await graph.maybe_free(target)
        raise
    await let_start(job)
