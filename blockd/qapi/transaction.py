"""``transaction`` models (QEMU's qapi/transaction.json).

**Adding an action type** (e.g. ``blockdev-snapshot``): add a value to
:class:`TransactionActionKind`, a wrapper model ``{type: Literal[kind], data: ArgsModel}`` to
:data:`ACTION_MODELS`, and an ops class to ``ACTION_OPS`` in
:mod:`blockd.qmp.commands.transaction`. The union below is built from :data:`ACTION_MODELS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from blockd.qapi.backup import BlockdevBackup, DriveBackup
from blockd.qapi.base import QapiEnum, QapiModel, flat_union
from blockd.qapi.bitmap import BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapMerge
from blockd.qapi.snapshot import BlockdevSnapshot, BlockdevSnapshotSync


class TransactionActionKind(QapiEnum):
    ABORT = "abort"
    BLOCK_DIRTY_BITMAP_ADD = "block-dirty-bitmap-add"
    BLOCK_DIRTY_BITMAP_REMOVE = "block-dirty-bitmap-remove"
    BLOCK_DIRTY_BITMAP_CLEAR = "block-dirty-bitmap-clear"
    BLOCK_DIRTY_BITMAP_ENABLE = "block-dirty-bitmap-enable"
    BLOCK_DIRTY_BITMAP_DISABLE = "block-dirty-bitmap-disable"
    BLOCK_DIRTY_BITMAP_MERGE = "block-dirty-bitmap-merge"
    BLOCKDEV_BACKUP = "blockdev-backup"
    BLOCKDEV_SNAPSHOT = "blockdev-snapshot"
    BLOCKDEV_SNAPSHOT_SYNC = "blockdev-snapshot-sync"
    DRIVE_BACKUP = "drive-backup"


class ActionCompletionMode(QapiEnum):
    INDIVIDUAL = "individual"
    GROUPED = "grouped"


class Abort(QapiModel):
    """The ``abort`` action's (empty) data."""


K = TransactionActionKind


class AbortWrapper(QapiModel):
    type: Literal[K.ABORT]
    data: Abort


class BlockDirtyBitmapAddWrapper(QapiModel):
    type: Literal[K.BLOCK_DIRTY_BITMAP_ADD]
    data: BlockDirtyBitmapAdd


class BlockDirtyBitmapRemoveWrapper(QapiModel):
    type: Literal[K.BLOCK_DIRTY_BITMAP_REMOVE]
    data: BlockDirtyBitmap


class BlockDirtyBitmapClearWrapper(QapiModel):
    type: Literal[K.BLOCK_DIRTY_BITMAP_CLEAR]
    data: BlockDirtyBitmap


class BlockDirtyBitmapEnableWrapper(QapiModel):
    type: Literal[K.BLOCK_DIRTY_BITMAP_ENABLE]
    data: BlockDirtyBitmap


class BlockDirtyBitmapDisableWrapper(QapiModel):
    type: Literal[K.BLOCK_DIRTY_BITMAP_DISABLE]
    data: BlockDirtyBitmap


class BlockDirtyBitmapMergeWrapper(QapiModel):
    type: Literal[K.BLOCK_DIRTY_BITMAP_MERGE]
    data: BlockDirtyBitmapMerge


class BlockdevBackupWrapper(QapiModel):
    type: Literal[K.BLOCKDEV_BACKUP]
    data: BlockdevBackup


class BlockdevSnapshotWrapper(QapiModel):
    type: Literal[K.BLOCKDEV_SNAPSHOT]
    data: BlockdevSnapshot


class BlockdevSnapshotSyncWrapper(QapiModel):
    type: Literal[K.BLOCKDEV_SNAPSHOT_SYNC]
    data: BlockdevSnapshotSync


class DriveBackupWrapper(QapiModel):
    type: Literal[K.DRIVE_BACKUP]
    data: DriveBackup


#: action type -> wrapper model; the hook for new action types (see module docstring).
ACTION_MODELS: dict[str, type[QapiModel]] = {
    K.ABORT.value: AbortWrapper,
    K.BLOCK_DIRTY_BITMAP_ADD.value: BlockDirtyBitmapAddWrapper,
    K.BLOCK_DIRTY_BITMAP_REMOVE.value: BlockDirtyBitmapRemoveWrapper,
    K.BLOCK_DIRTY_BITMAP_CLEAR.value: BlockDirtyBitmapClearWrapper,
    K.BLOCK_DIRTY_BITMAP_ENABLE.value: BlockDirtyBitmapEnableWrapper,
    K.BLOCK_DIRTY_BITMAP_DISABLE.value: BlockDirtyBitmapDisableWrapper,
    K.BLOCK_DIRTY_BITMAP_MERGE.value: BlockDirtyBitmapMergeWrapper,
    K.BLOCKDEV_BACKUP.value: BlockdevBackupWrapper,
    K.BLOCKDEV_SNAPSHOT.value: BlockdevSnapshotWrapper,
    K.BLOCKDEV_SNAPSHOT_SYNC.value: BlockdevSnapshotSyncWrapper,
    K.DRIVE_BACKUP.value: DriveBackupWrapper,
}

if TYPE_CHECKING:
    # What every branch has; the runtime union picks the branch by "type".
    class TransactionAction(QapiModel):
        type: TransactionActionKind
        data: Any
else:
    TransactionAction = flat_union("TransactionAction", "type", ACTION_MODELS)


class TransactionProperties(QapiModel):
    completion_mode: ActionCompletionMode | None = None


class TransactionArgs(QapiModel):
    actions: list[TransactionAction]
    properties: TransactionProperties | None = None
