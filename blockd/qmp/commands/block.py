"""Block graph commands: blockdev-add, blockdev-del, query-named-block-nodes, blockdev-create."""

from __future__ import annotations

import asyncio
from typing import Any

from blockd.block.query import block_device_info
from blockd.errors import QmpError
from blockd.job.create import CreateJob
from blockd.qapi.base import QapiModel
from blockd.qapi.block import BlockdevCreateOptions, BlockDeviceInfo, BlockdevOptions
from blockd.qmp.registry import Context, command

#: Seconds blockdev-create waits for its job to conclude before replying.
CREATE_REPLY_WAIT = 0.5


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
    # QSD's monitor goes through its main loop between two commands, so its create of a
    # small file has usually concluded when the next command is read; blockd reads commands
    # queued on a connection back to back, and a job-dismiss sent right behind the create
    # found the job still running. Waiting here for a create that is quick (a few hundred
    # microseconds of syscalls for a sparse file) makes that sequence work every time; a
    # long one (preallocating a big image) goes on running after the reply.
    assert job.task is not None
    await asyncio.wait({job.task}, timeout=CREATE_REPLY_WAIT)
