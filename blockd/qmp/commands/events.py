"""The events blockd emits, declared for introspection (QEMU's event list in the schema)."""

from blockd.qapi.job import (
    BlockJobCancelledEvent,
    BlockJobCompletedEvent,
    BlockJobErrorEvent,
    BlockJobPendingEvent,
    BlockJobReadyEvent,
    JobStatusChangeEvent,
)
from blockd.qmp.registry import event

event("JOB_STATUS_CHANGE", JobStatusChangeEvent)
event("BLOCK_JOB_COMPLETED", BlockJobCompletedEvent)
event("BLOCK_JOB_CANCELLED", BlockJobCancelledEvent)
event("BLOCK_JOB_ERROR", BlockJobErrorEvent)
event("BLOCK_JOB_READY", BlockJobReadyEvent)
event("BLOCK_JOB_PENDING", BlockJobPendingEvent)
