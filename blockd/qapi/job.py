"""Job models: states, verbs, types and the query replies (QEMU's qapi/job.json and the
block-job parts of qapi/block-core.json)."""

from __future__ import annotations

from blockd.qapi.base import QapiEnum, QapiModel


class JobType(QapiEnum):
    COMMIT = "commit"
    STREAM = "stream"
    MIRROR = "mirror"
    BACKUP = "backup"
    CREATE = "create"
    AMEND = "amend"
    SNAPSHOT_LOAD = "snapshot-load"
    SNAPSHOT_SAVE = "snapshot-save"
    SNAPSHOT_DELETE = "snapshot-delete"


class JobStatus(QapiEnum):
    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(QapiEnum):
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"
    CHANGE = "change"


class BlockDeviceIoStatus(QapiEnum):
    OK = "ok"
    FAILED = "failed"
    NOSPACE = "nospace"


class BlockdevOnError(QapiEnum):
    REPORT = "report"
    IGNORE = "ignore"
    ENOSPC = "enospc"
    STOP = "stop"
    AUTO = "auto"


class JobInfo(QapiModel):
    id: str
    type: JobType
    status: JobStatus
    current_progress: int
    total_progress: int
    error: str | None = None


class BlockJobInfo(QapiModel):
    type: str
    device: str
    len: int
    offset: int
    busy: bool
    paused: bool
    speed: int
    io_status: BlockDeviceIoStatus
    ready: bool
    status: JobStatus
    auto_finalize: bool
    auto_dismiss: bool
    error: str | None = None


class JobIdArgs(QapiModel):
    id: str


class BlockJobDeviceArgs(QapiModel):
    device: str


class BlockJobCancelArgs(QapiModel):
    device: str
    force: bool | None = None


class BlockJobSetSpeedArgs(QapiModel):
    device: str
    speed: int


# -- events ------------------------------------------------------------------------------------
class JobStatusChangeEvent(QapiModel):
    id: str
    status: JobStatus


class BlockJobCompletedEvent(QapiModel):
    type: JobType
    device: str
    len: int
    offset: int
    speed: int
    error: str | None = None


class BlockJobCancelledEvent(QapiModel):
    type: JobType
    device: str
    len: int
    offset: int
    speed: int


class BlockJobReadyEvent(BlockJobCancelledEvent):
    pass


class IoOperationType(QapiEnum):
    READ = "read"
    WRITE = "write"


class BlockErrorAction(QapiEnum):
    IGNORE = "ignore"
    REPORT = "report"
    STOP = "stop"


class BlockJobErrorEvent(QapiModel):
    device: str
    operation: IoOperationType
    action: BlockErrorAction


class BlockJobPendingEvent(QapiModel):
    type: JobType
    id: str
