"""block-stream (QEMU's blockdev.c qmp_block_stream)."""

from __future__ import annotations

from blockd.job.stream import start_stream
from blockd.qapi.stream import BlockStream
from blockd.qmp.registry import Context, command


@command("block-stream", BlockStream)
async def qmp_block_stream(ctx: Context, args: BlockStream) -> None:
    await start_stream(ctx.daemon.jobs, ctx.daemon.graph, args)
