"""blockdev-snapshot-sync and blockdev-snapshot."""

from __future__ import annotations

from blockd.block.snapshot import ExternalSnapshot
from blockd.qapi.snapshot import BlockdevSnapshot, BlockdevSnapshotSync, NewImageMode
from blockd.qmp.registry import Context, command


async def snapshot_sync(ctx: Context, args: BlockdevSnapshotSync) -> ExternalSnapshot:
    snap = ExternalSnapshot(ctx.daemon.graph)
    await snap.prepare_sync(
        device=args.device,
        node_name=args.node_name,
        snapshot_file=args.snapshot_file,
        snapshot_node_name=args.snapshot_node_name,
        fmt=args.format or "qcow2",
        mode=(args.mode or NewImageMode.ABSOLUTE_PATHS).value,
    )
    return snap


@command("blockdev-snapshot-sync", BlockdevSnapshotSync)
async def qmp_blockdev_snapshot_sync(ctx: Context, args: BlockdevSnapshotSync) -> None:
    snap = await snapshot_sync(ctx, args)
    try:
        await snap.commit()
    except BaseException:
        await snap.abort()
        raise


@command("blockdev-snapshot", BlockdevSnapshot, features=("allow-write-only-overlay",))
async def qmp_blockdev_snapshot(ctx: Context, args: BlockdevSnapshot) -> None:
    snap = ExternalSnapshot(ctx.daemon.graph)
    snap.prepare_existing(args.node, args.overlay)
    await snap.commit()
