"""Block graph commands: blockdev-add, blockdev-del, query-named-block-nodes, blockdev-create."""

from __future__ import annotations

from typing import Any

from blockd.block.query import block_device_info
from blockd.errors import QmpError
from blockd.job.create import CreateJob
from blockd.qapi.base import QapiModel
from blockd.qapi.block import BlockdevCreateOptions, BlockDeviceInfo, BlockdevOptions
from blockd.qmp.registry import Context, command


class BlockdevDelArgs(QapiModel):
    node_name: str


class QueryNamedBlockNodesArgs(QapiModel):
    flat: bool | None = None


class BlockdevCreateArgs(QapiModel):
    job_id: str
    options: BlockdevCreateOptions


@command("blockdev-add", BlockdevOptions)
async def qmp_blockdev_add(ctx: Context, args: Any) -> None:
    await ctx.daemon.graph.add(args)


@command("blockdev-del", BlockdevDelArgs)
async def qmp_blockdev_del(ctx: Context, args: BlockdevDelArgs) -> None:
    await ctx.daemon.graph.delete(args.node_name)


@command("query-named-block-nodes", QueryNamedBlockNodesArgs, returns=list[BlockDeviceInfo])
async def qmp_query_named_block_nodes(
    ctx: Context, args: QueryNamedBlockNodesArgs
) -> list[dict[str, Any]]:
    return [block_device_info(n, bool(args.flat)) for n in ctx.daemon.graph.newest_first()]


@command("blockdev-create", BlockdevCreateArgs)
async def qmp_blockdev_create(ctx: Context, args: BlockdevCreateArgs) -> None:
    from blockd.block.driver import driver_class

    cls = driver_class(args.options.driver.value)
    if cls is None or not cls.can_create:
        raise QmpError("Driver does not support blockdev-create")
    jobs = ctx.daemon.jobs
    jobs.check_new_id(args.job_id)
    job = CreateJob(jobs, args.job_id, args.options, ctx.daemon.graph)
    job.create()
    job.start()
