"""blockdev-reopen, block_resize and change-backing-file (QEMU's blockdev.c)."""

from __future__ import annotations

from blockd.block.reopen import blockdev_reopen
from blockd.block.resize import block_resize, change_backing_file
from blockd.qapi.blockops import BlockdevReopen, BlockResize, ChangeBackingFile
from blockd.qmp.registry import Context, command


@command("blockdev-reopen", BlockdevReopen)
async def qmp_blockdev_reopen(ctx: Context, args: BlockdevReopen) -> None:
    await blockdev_reopen(ctx.daemon.graph, list(args.options))


@command("block_resize", BlockResize)
async def qmp_block_resize(ctx: Context, args: BlockResize) -> None:
    await block_resize(ctx.daemon.graph, args.device, args.node_name, args.size)


@command("change-backing-file", ChangeBackingFile)
async def qmp_change_backing_file(ctx: Context, args: ChangeBackingFile) -> None:
    graph = ctx.daemon.graph
    await change_backing_file(graph, args.device, args.image_node_name, args.backing_file)
