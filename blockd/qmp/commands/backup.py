"""blockdev-backup and drive-backup (QEMU's blockdev.c: qmp_blockdev_backup,
qmp_drive_backup). As in QEMU, each is a one-action ``transaction``, which is where the
``paused``/``running`` blip after ``running`` comes from."""

from __future__ import annotations

from blockd.qapi.backup import BlockdevBackup, DriveBackup
from blockd.qmp.commands.transaction import run_transaction
from blockd.qmp.registry import Context, command


@command("blockdev-backup", BlockdevBackup)
async def qmp_blockdev_backup(ctx: Context, args: BlockdevBackup) -> None:
    await run_transaction(ctx, [("blockdev-backup", args)])


@command("drive-backup", DriveBackup, features=("deprecated",))
async def qmp_drive_backup(ctx: Context, args: DriveBackup) -> None:
    await run_transaction(ctx, [("drive-backup", args)])
