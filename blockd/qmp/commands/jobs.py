"""Job verbs and queries: job-* (any job) and block-job-* (block jobs only), with QEMU's
lookup errors: ``Job not found`` versus DeviceNotActive ``Block job 'x' not found``."""

from __future__ import annotations

from typing import Any

from blockd.errors import QmpError
from blockd.job.blockjob import BlockJob
from blockd.qapi.job import (
    BlockJobCancelArgs,
    BlockJobDeviceArgs,
    BlockJobInfo,
    BlockJobSetSpeedArgs,
    JobIdArgs,
    JobInfo,
)
from blockd.qmp.registry import Context, command


@command("query-jobs", returns=list[JobInfo])
async def qmp_query_jobs(ctx: Context, args: Any) -> list[dict[str, Any]]:
    await ctx.daemon.jobs.settle()
    return [j.info() for j in ctx.daemon.jobs.newest_first()]


@command("query-block-jobs", returns=list[BlockJobInfo])
async def qmp_query_block_jobs(ctx: Context, args: Any) -> list[dict[str, Any]]:
    await ctx.daemon.jobs.settle()
    return [j.block_info() for j in ctx.daemon.jobs.newest_first() if isinstance(j, BlockJob)]


@command("job-pause", JobIdArgs)
async def qmp_job_pause(ctx: Context, args: JobIdArgs) -> None:
    job = ctx.daemon.jobs.get(args.id)
    job.user_pause()
    await job.after_user_pause()


@command("job-resume", JobIdArgs)
async def qmp_job_resume(ctx: Context, args: JobIdArgs) -> None:
    ctx.daemon.jobs.get(args.id).user_resume()


@command("job-cancel", JobIdArgs)
async def qmp_job_cancel(ctx: Context, args: JobIdArgs) -> None:
    await ctx.daemon.jobs.get(args.id).user_cancel(force=True)


@command("job-complete", JobIdArgs)
async def qmp_job_complete(ctx: Context, args: JobIdArgs) -> None:
    await ctx.daemon.jobs.get(args.id).user_complete()


@command("job-finalize", JobIdArgs)
async def qmp_job_finalize(ctx: Context, args: JobIdArgs) -> None:
    await ctx.daemon.jobs.get(args.id).user_finalize()


@command("job-dismiss", JobIdArgs)
async def qmp_job_dismiss(ctx: Context, args: JobIdArgs) -> None:
    ctx.daemon.jobs.get(args.id).user_dismiss()


@command("block-job-pause", BlockJobDeviceArgs)
async def qmp_block_job_pause(ctx: Context, args: BlockJobDeviceArgs) -> None:
    job = ctx.daemon.jobs.get_block_job(args.device)
    job.user_pause()
    await job.after_user_pause()


@command("block-job-resume", BlockJobDeviceArgs)
async def qmp_block_job_resume(ctx: Context, args: BlockJobDeviceArgs) -> None:
    ctx.daemon.jobs.get_block_job(args.device).user_resume()


@command("block-job-cancel", BlockJobCancelArgs)
async def qmp_block_job_cancel(ctx: Context, args: BlockJobCancelArgs) -> None:
    job = ctx.daemon.jobs.get_block_job(args.device)
    if job.user_paused and not args.force:
        raise QmpError(f"The block job for device '{args.device}' is currently paused")
    await job.user_cancel(force=bool(args.force))


@command("block-job-complete", BlockJobDeviceArgs)
async def qmp_block_job_complete(ctx: Context, args: BlockJobDeviceArgs) -> None:
    await ctx.daemon.jobs.get_block_job(args.device).user_complete()


@command("block-job-set-speed", BlockJobSetSpeedArgs)
async def qmp_block_job_set_speed(ctx: Context, args: BlockJobSetSpeedArgs) -> None:
    job = ctx.daemon.jobs.get_block_job(args.device)
    assert isinstance(job, BlockJob)
    job.set_speed(args.speed)


@command("block-job-finalize", JobIdArgs)
async def qmp_block_job_finalize(ctx: Context, args: JobIdArgs) -> None:
    await ctx.daemon.jobs.get_block_job(args.id).user_finalize()


@command("block-job-dismiss", JobIdArgs)
async def qmp_block_job_dismiss(ctx: Context, args: JobIdArgs) -> None:
    ctx.daemon.jobs.get_block_job(args.id).user_dismiss()
