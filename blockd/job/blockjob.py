"""The block-job layer on top of the job core (QEMU's blockjob.c): speed limit, error policy,
io-status, the BLOCK_JOB_* events and the ``query-block-jobs`` view. Backup, mirror, stream and
commit are block jobs; ``blockdev-create`` is not."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, ClassVar

from blockd.copy.block_copy import DEFAULT_WORKERS, BlockCopy, BlockCopyError
from blockd.errors import QmpError, strerror
from blockd.io.ratelimit import RateLimit
from blockd.job.core import Job
from blockd.job.joblog import JobLog
from blockd.qapi.job import BlockdevOnError, JobVerb
from blockd.qapi.job import JobStatus as S


class BlockJob(Job):
    is_block_job: ClassVar[bool] = True

    def __init__(self, manager: Any, job_id: str, *, speed: int = 0, **kw: Any) -> None:
        super().__init__(manager, job_id, **kw)
        if speed < 0:
            raise QmpError("Parameter 'speed' expects a non-negative value")
        self.ratelimit = RateLimit(speed)
        self.iostatus = "ok"
        self.on_source_error = BlockdevOnError.REPORT
        self.on_target_error = BlockdevOnError.REPORT
        self.joblog = JobLog(job_id, self.job_type.value)
        #: Where the error that failed the job happened, for the log ("writing target 't'").
        self.error_cause: str | None = None

    def describe(self) -> str:
        """What the job works on, for its start and end log lines."""
        return ""

    def start(self) -> None:
        self.joblog.started(self.describe())
        super().start()

    @property
    def speed(self) -> int:
        return self.ratelimit.speed

    def set_speed(self, speed: int) -> None:
        self.check_verb(JobVerb.SET_SPEED)
        if speed < 0:
            raise QmpError("Parameter 'speed' expects a non-negative value")
        self.ratelimit.set_speed(speed)
        self.enter()  # a throttled job re-computes its delay at once

    # -- speed limit (also the Pacer protocol of blockd.copy.block_copy) -------------------
    def rate_limited(self) -> bool:
        return self.speed > 0

    def account(self, nbytes: int) -> None:
        """Count *nbytes* against the speed limit without waiting (copy-before-write is never
        held back); the delay they cause is waited for by the next :meth:`pace`."""
        self.ratelimit.delay_ns(nbytes)

    async def pace(self) -> None:
        """Wait while the bytes counted so far are ahead of the speed limit, looking again
        after each wait (others may have counted more meanwhile), as QEMU's block-copy does.
        A pause point when there is nothing to wait for."""
        slept = False
        while (delay := self.ratelimit.delay_ns(0)) > 0:
            await self.sleep(delay / 1e9)
            slept = True
        if not slept:
            await self.pause_point()

    def on_user_resume(self) -> None:
        self.iostatus = "ok"

    def error_action(self, is_read: bool, err: int) -> str:
        """Apply the job's on-*-error policy to a failed request (QEMU's
        block_job_error_action): emit BLOCK_JOB_ERROR and return ignore/report/stop."""
        policy = self.on_source_error if is_read else self.on_target_error
        if policy in (BlockdevOnError.REPORT, BlockdevOnError.AUTO):
            action = "report"
        elif policy == BlockdevOnError.IGNORE:
            action = "ignore"
        elif policy == BlockdevOnError.STOP:
            action = "stop"
        else:  # enospc
            action = "stop" if err == errno.ENOSPC else "report"
        self.manager.emit(
            "BLOCK_JOB_ERROR",
            {"device": self.id, "operation": "read" if is_read else "write", "action": action},
        )
        if action == "stop":
            self.iostatus = "nospace" if err == errno.ENOSPC else "failed"
            self.user_paused = True
            self.pause()
        return action

    async def copy_round(
        self,
        bcs: BlockCopy,
        offset: int,
        nbytes: int,
        *,
        max_workers: int = DEFAULT_WORKERS,
        on_stop: Callable[[], None] | None = None,
        one_pass: bool = False,
    ) -> bool:
        """Copy what is dirty in the range under the job's error policy: True when all of it
        was copied; False after a failure the policy lets the job go on from (``ignore``, or
        ``stop`` and then resumed; what failed is dirty again for the next round). Raises
        OSError for ``report``. *on_stop* runs before the job stops (mirror lets the guest
        go first). *one_pass*: see BlockCopy.run."""
        try:
            await bcs.run(offset, nbytes, max_workers=max_workers, pacer=self, one_pass=one_pass)
        except BlockCopyError as exc:
            action = self.error_action(exc.is_read, exc.errno)
            if action == "report":
                self.error_cause = (
                    f"reading source '{bcs.source.node_name}'"
                    if exc.is_read
                    else f"writing target '{bcs.target.node_name}'"
                )
                raise OSError(exc.errno, strerror(exc.errno)) from exc
            if action == "stop":
                if on_stop is not None:
                    on_stop()
                await self.pause_point()
            return False
        return True

    def _event_data(self) -> dict[str, Any]:
        return {
            "type": self.job_type.value,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "speed": self.speed,
        }

    def on_finalized_event(self) -> None:
        data = self._event_data()
        if self.force_cancel:
            self.joblog.ended("cancelled", self.progress_current)
            self.manager.emit("BLOCK_JOB_CANCELLED", data)
        else:
            if self.ret:
                data["error"] = self.error
                cause = f" ({self.error_cause})" if self.error_cause else ""
                self.joblog.ended("failed", self.progress_current, f"{self.error}{cause}")
            else:
                self.joblog.ended("completed", self.progress_current)
            self.manager.emit("BLOCK_JOB_COMPLETED", data)

    def on_pending_event(self) -> None:
        self.manager.emit("BLOCK_JOB_PENDING", {"type": self.job_type.value, "id": self.id})

    def emit_ready(self) -> None:
        self._transition(S.READY)
        self.manager.emit("BLOCK_JOB_READY", self._event_data())

    def block_info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.job_type.value,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "busy": self.busy,
            "paused": self.pause_count > 0 or self.paused,
            "speed": self.speed,
            "io-status": self.iostatus,
            "ready": self.is_ready,
            "status": self.status.value,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.status == S.CONCLUDED and self.ret:
            out["error"] = self.error
        return out
