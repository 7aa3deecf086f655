"""Backup command models (QEMU's qapi/block-core.json: BlockdevBackup, DriveBackup,
BackupPerf, MirrorSyncMode, BitmapSyncMode, NewImageMode)."""

from __future__ import annotations

from blockd.qapi.base import QapiEnum, QapiModel
from blockd.qapi.job import BlockdevOnError


class MirrorSyncMode(QapiEnum):
    TOP = "top"
    FULL = "full"
    NONE = "none"
    INCREMENTAL = "incremental"
    BITMAP = "bitmap"


class BitmapSyncMode(QapiEnum):
    ON_SUCCESS = "on-success"
    NEVER = "never"
    ALWAYS = "always"


class NewImageMode(QapiEnum):
    EXISTING = "existing"
    ABSOLUTE_PATHS = "absolute-paths"


class BackupPerf(QapiModel):
    """``x-perf``: unstable tuning knobs; max-workers bounds requests in flight, max-chunk
    bounds one request."""

    use_copy_range: bool | None = None
    max_workers: int | None = None
    max_chunk: int | None = None


class BackupCommon(QapiModel):
    """Members shared by blockdev-backup and drive-backup (QAPI's BackupCommon)."""

    job_id: str | None = None
    device: str
    sync: MirrorSyncMode
    speed: int | None = None
    bitmap: str | None = None
    bitmap_mode: BitmapSyncMode | None = None
    compress: bool | None = None
    on_source_error: BlockdevOnError | None = None
    on_target_error: BlockdevOnError | None = None
    auto_finalize: bool | None = None
    auto_dismiss: bool | None = None
    filter_node_name: str | None = None
    x_perf: BackupPerf | None = None


class BlockdevBackup(BackupCommon):
    target: str


class DriveBackup(BackupCommon):
    target: str
    format: str | None = None
    mode: NewImageMode | None = None
