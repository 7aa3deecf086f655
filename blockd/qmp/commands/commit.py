"""block-commit (QEMU's blockdev.c: qmp_block_commit): which nodes the arguments name, in
QEMU's order of checks, then an intermediate commit (:mod:`blockd.job.commit`) or, when the
top is the active layer or has a writer, an active commit (a mirror into the base,
:mod:`blockd.job.mirror`)."""

from __future__ import annotations

import os

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.block.perm import Perm
from blockd.errors import DeviceNotFoundError, QmpError
from blockd.job.commit import reopen_drained, start_commit
from blockd.job.mirror import MirrorParams, chain_contains, is_root, let_start, start_mirror
from blockd.qapi.job import BlockdevOnError
from blockd.qapi.mirror import BlockCommit
from blockd.qmp.registry import Context, command


def _below(node: BlockNode) -> BlockNode | None:
    return node.filtered_child() if node.driver.is_filter else node.backing


def find_backing_image(bs: BlockNode, name: str) -> BlockNode | None:
    """The node below *bs* whose image is *name* (QEMU's bdrv_find_backing_image): the same
    file name as given, or the same file once a relative name is taken relative to the
    overlay's directory."""
    overlay = bs
    cur = _below(bs)
    while cur is not None:
        fname = cur.filename
        if fname == name:
            return cur
        if not name.startswith("json:") and not fname.startswith("json:"):
            here = os.path.dirname(overlay.skip_filters().filename)
            want = name if os.path.isabs(name) else os.path.join(here, name)
            if os.path.realpath(want) == os.path.realpath(fname):
                return cur
        if not cur.driver.is_filter:
            overlay = cur
        cur = _below(cur)
    return None


def _bottom(node: BlockNode) -> BlockNode:
    """The last node of the chain (QEMU's bdrv_find_base)."""
    while (below := _below(node)) is not None:
        node = below
    return node


def _overlay_of(bs: BlockNode, node: BlockNode) -> BlockNode | None:
    cur: BlockNode | None = bs
    while cur is not None:
        below = _below(cur)
        if below is node:
            return cur
        cur = below
    return None


def _resolve(graph: BlockGraph, args: BlockCommit) -> tuple[BlockNode, BlockNode, BlockNode]:
    """(device, top, base) as qmp_block_commit finds them, with its refusals."""
    try:
        bs = graph.lookup(args.device, args.device)
    except QmpError:
        raise DeviceNotFoundError(f"Device '{args.device}' not found") from None
    if not is_root(bs):
        raise QmpError("Need a root block node")
    bs.check_not_busy()
    top: BlockNode | None = bs
    if args.top_node is not None and args.top is not None:
        raise QmpError("'top-node' and 'top' are mutually exclusive")
    if args.top_node is not None:
        top = graph.lookup(args.top_node)
        if not chain_contains(bs, top):
            raise QmpError(f"'{args.top_node}' is not in this backing file chain")
    elif args.top is not None and bs.filename != args.top:
        top = find_backing_image(bs, args.top)
    if top is None:
        raise QmpError(f"Top image file {args.top or 'NULL'} not found")
    if args.base_node is not None and args.base is not None:
        raise QmpError("'base-node' and 'base' are mutually exclusive")
    if args.base_node is not None:
        base = graph.lookup(args.base_node)
        if not chain_contains(top, base):
            raise QmpError(f"'{args.base_node}' is not in this backing file chain")
    elif args.base is not None:
        found = find_backing_image(top, args.base)
        if found is None:
            raise QmpError(f"Can't find '{args.base}' in the backing chain")
        base = found
    else:
        base = _bottom(top)
    cur: BlockNode | None = top
    stop = _below(base)
    while cur is not None and cur is not stop:
        cur.check_not_busy()
        cur = _below(cur)
    if top is base:
        raise QmpError("cannot commit an image into itself")
    return bs, top, base


@command("block-commit", BlockCommit)
async def qmp_block_commit(ctx: Context, args: BlockCommit) -> None:
    graph = ctx.daemon.graph
    bs, top, base = _resolve(graph, args)
    on_error = args.on_error or BlockdevOnError.REPORT
    speed = args.speed or 0
    auto_finalize = args.auto_finalize is not False
    auto_dismiss = args.auto_dismiss is not False
    top_perm, _ = top.cumulative_perms()
    if top_perm & Perm.WRITE or top.skip_filters() is bs.skip_filters():
        if args.backing_file is not None:
            if top.skip_filters() is bs.skip_filters():
                raise QmpError("'backing-file' specified, but 'top' is the active layer")
            raise QmpError("'backing-file' specified, but 'top' has a writer on it")
        base_ro = base.read_only
        if base_ro:
            await reopen_drained(graph, base, False)
        p = MirrorParams(
            job_id=args.job_id or "",
            speed=speed,
            on_source_error=on_error,
            on_target_error=on_error,
            auto_finalize=auto_finalize,
            auto_dismiss=auto_dismiss,
            filter_node_name=args.filter_node_name,
        )
        try:
            job = start_mirror(ctx.daemon.jobs, graph, top, base, p, base=base, is_commit=True)
        except BaseException:
            if base_ro:
                await reopen_drained(graph, base, True)
            raise
        job.base_was_read_only = base_ro
        await let_start(job)
        return
    overlay = _overlay_of(bs, top)
    if overlay is not None:
        overlay.check_not_busy()
    await start_commit(
        ctx.daemon.jobs,
        graph,
        args.job_id,
        bs,
        top,
        base,
        speed=speed,
        on_error=on_error,
        backing_file=args.backing_file,
        filter_node_name=args.filter_node_name,
        auto_finalize=auto_finalize,
        auto_dismiss=auto_dismiss,
    )
