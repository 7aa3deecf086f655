"""block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge (QEMU's block/monitor/
bitmap-qmp-cmds.c).

The ``*_prepare`` functions are shared with the ``transaction`` actions: each changes the
bitmap and returns what is needed to undo it, so a failed transaction leaves no trace.
Lookup texts differ per command as in QSD 7.2: ``add`` says ``Cannot find device='x' nor
node-name='x'``, the others ``Node 'x' not found``.
"""

from __future__ import annotations

from blockd.bitmap.dirty import (
    ALLOW_RO,
    BUSY,
    DEFAULT,
    RO,
    DirtyBitmap,
    check_can_store,
    check_granularity,
    create_bitmap,
    default_granularity,
    find_bitmap,
    release,
)
from blockd.bitmap.hbitmap import HBitmap
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.errors import QmpError
from blockd.qapi.bitmap import BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge
from blockd.qmp.registry import Context, command

UINT32_MAX = 2**32 - 1


def lookup_node(graph: BlockGraph, node: str) -> BlockNode:
    found = graph.find(node)
    if found is None:
        raise QmpError(f"Node '{node}' not found")
    return found


def lookup_bitmap(graph: BlockGraph, node: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    """QEMU's block_dirty_bitmap_lookup."""
    bs = lookup_node(graph, node)
    bm = find_bitmap(bs, name)
    if bm is None:
        raise QmpError(f"Dirty bitmap '{name}' not found")
    return bs, bm


# -- add ------------------------------------------------------------------------------------
def bitmap_add(graph: BlockGraph, args: BlockDirtyBitmapAdd) -> DirtyBitmap:
    if args.granularity is not None and not 0 <= args.granularity <= UINT32_MAX:
        raise QmpError("Parameter 'granularity' expects uint32_t")
    if not args.name:
        raise QmpError("Bitmap name cannot be empty")
    node = graph.lookup(args.node, args.node)
    if args.granularity is not None:
        check_granularity(args.granularity)
        granularity = args.granularity
    else:
        granularity = default_granularity(node)
    if args.persistent:
        if find_bitmap(node, args.name) is not None:
            raise QmpError(f"Bitmap already exists: {args.name}")
        check_can_store(node, args.name, granularity)
    return create_bitmap(
        node,
        args.name,
        granularity,
        disabled=bool(args.disabled),
        persistent=bool(args.persistent),
    )


# -- remove ---------------------------------------------------------------------------------
def bitmap_remove_prepare(graph: BlockGraph, args: BlockDirtyBitmap) -> DirtyBitmap:
    """Check that *args* may be removed; the caller releases it (at once, or at commit)."""
    _, bm = lookup_bitmap(graph, args.node, args.name)
    bm.check(BUSY | RO)
    return bm


async def bitmap_remove_commit(bm: DirtyBitmap) -> None:
    if bm.persistent and bm.name is not None:
        await bm.node.driver.remove_persistent_dirty_bitmap(bm.name)
    release(bm.node, bm)


# -- clear / enable / disable ---------------------------------------------------------------
def bitmap_clear_prepare(graph: BlockGraph, args: BlockDirtyBitmap) -> tuple[DirtyBitmap, HBitmap]:
    _, bm = lookup_bitmap(graph, args.node, args.name)
    bm.check(DEFAULT)
    saved = bm.hb.copy()
    bm.clear()
    return bm, saved


def bitmap_set_enabled(
    graph: BlockGraph, args: BlockDirtyBitmap, enable: bool
) -> tuple[DirtyBitmap, bool]:
    """Enable or disable; returns the bitmap and its previous ``disabled`` for undo."""
    _, bm = lookup_bitmap(graph, args.node, args.name)
    bm.check(ALLOW_RO)
    was = bm.disabled
    bm.disabled = not enable
    return bm, was


# -- merge ----------------------------------------------------------------------------------
def bitmap_merge_prepare(
    graph: BlockGraph, args: BlockDirtyBitmapMerge
) -> tuple[DirtyBitmap, HBitmap]:
    """OR every source into the target (QEMU's block_dirty_bitmap_merge: sources are merged
    into an anonymous bitmap first, so an error in any source leaves the target untouched).
    An empty source list is a no-op (QSD 7.2 crashes on it)."""
    node, dst = lookup_bitmap(graph, args.node, args.target)
    dst.check(DEFAULT)  # before any source, as QSD 7.2 answers
    anon = HBitmap(dst.hb.size, dst.granularity)
    for src_ref in args.bitmaps:
        if isinstance(src_ref, str):
            src = find_bitmap(node, src_ref)
            if src is None:
                raise QmpError(f"Dirty bitmap '{src_ref}' not found")
        else:
            _, src = lookup_bitmap(graph, src_ref.node, src_ref.name)
        src.check(ALLOW_RO)
        if src.hb.size != anon.size:
            raise QmpError("Bitmaps are incompatible and can't be merged")
        anon.merge(src.hb)
    saved = dst.hb.copy()
    dst.merge_from(anon)
    return dst, saved


# -- commands -------------------------------------------------------------------------------
@command("block-dirty-bitmap-add", BlockDirtyBitmapAdd)
async def qmp_block_dirty_bitmap_add(ctx: Context, args: BlockDirtyBitmapAdd) -> None:
    bitmap_add(ctx.daemon.graph, args)


@command("block-dirty-bitmap-remove", BlockDirtyBitmap)
async def qmp_block_dirty_bitmap_remove(ctx: Context, args: BlockDirtyBitmap) -> None:
    bm = bitmap_remove_prepare(ctx.daemon.graph, args)
    await bitmap_remove_commit(bm)


@command("block-dirty-bitmap-clear", BlockDirtyBitmap)
async def qmp_block_dirty_bitmap_clear(ctx: Context, args: BlockDirtyBitmap) -> None:
    bitmap_clear_prepare(ctx.daemon.graph, args)


@command("block-dirty-bitmap-enable", BlockDirtyBitmap)
async def qmp_block_dirty_bitmap_enable(ctx: Context, args: BlockDirtyBitmap) -> None:
    bitmap_set_enabled(ctx.daemon.graph, args, True)


@command("block-dirty-bitmap-disable", BlockDirtyBitmap)
async def qmp_block_dirty_bitmap_disable(ctx: Context, args: BlockDirtyBitmap) -> None:
    bitmap_set_enabled(ctx.daemon.graph, args, False)


@command("block-dirty-bitmap-merge", BlockDirtyBitmapMerge)
async def qmp_block_dirty_bitmap_merge(ctx: Context, args: BlockDirtyBitmapMerge) -> None:
    bitmap_merge_prepare(ctx.daemon.graph, args)
