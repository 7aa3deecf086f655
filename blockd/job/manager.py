"""The job registry: ids, lookup with QEMU's errors, queries, shutdown (QEMU's job list and
the qmp_job_* / qmp_block_job_* lookups)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any

from blockd.errors import DeviceNotActiveError, QmpError
from blockd.job.core import Job

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")
#: Seconds a force-cancelled job gets to reach a pause point at shutdown, and again to abort
#: after its task was interrupted.
CANCEL_GRACE = 3.0
#: Seconds a job query waits for jobs finishing their automatic finalization.
SETTLE_WAIT = 1.0


class JobManager:
    def __init__(self, emit: Callable[[str, dict[str, Any]], None]) -> None:
        self.emit = emit
        self.jobs: dict[str, Job] = {}

    def check_new_id(self, job_id: str | None) -> str:
        job_id = job_id or ""
        if not _ID_RE.match(job_id):
            raise QmpError(f"Invalid job ID '{job_id}'")
        if job_id in self.jobs:
            raise QmpError(f"Job ID '{job_id}' already in use")
        return job_id

    def register(self, job: Job) -> None:
        self.check_new_id(job.id)
        self.jobs[job.id] = job

    def unregister(self, job: Job) -> None:
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise QmpError("Job not found")
        return job

    def get_block_job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None or not job.is_block_job:
            raise DeviceNotActiveError(f"Block job '{job_id}' not found")
        return job

    def newest_first(self) -> list[Job]:
        return list(reversed(self.jobs.values()))

    async def settle(self, timeout: float = SETTLE_WAIT) -> None:
        """Wait (at most *timeout*) for transactions in the middle of finalizing or aborting.

        QEMU finalizes a job in one step that no monitor command can interleave with, so
        ``query-block-jobs`` never shows a job that finalizes itself as ``pending``; here the
        finalization awaits I/O (drive-backup closing its target takes milliseconds), and a
        query in between listed a finished backup as ``pending``. A job resting in
        ``pending`` (auto-finalize off) or ``waiting`` for its transaction is not waited for.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Checked again after every wait, and returned from only on a check that found
        # nothing settling: the caller reads the jobs without yielding in between.
        while busy := {j.txn for j in self.jobs.values() if j.txn and j.txn.is_settling}:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(t.wait_settled() for t in busy)), remaining)

    async def cancel_all(self, grace: float = CANCEL_GRACE) -> None:
        """Shutdown (``quit``, SIGTERM): force-cancel every running job and wait for it, at
        most *grace* seconds; a job still running then (stuck in a request to a server that
        stopped answering) has its task cancelled, which ends the request it waits for, and
        gets *grace* more to abort and clean up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for job in list(self.jobs.values()):
            if not job.is_completed and job.status.value != "null":
                # Cancelling a job can wait for the others of its transaction: bounded too.
                cancel = asyncio.ensure_future(job.user_cancel(force=True))
                cancel.add_done_callback(_ignore_refusal)
                await asyncio.wait({cancel}, timeout=max(0.0, deadline - loop.time()))
        pending = self._running_tasks()
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
        pending = self._running_tasks()
        if not pending:
            return
        for task in pending:
            log.warning("%s did not stop in %.0f s; interrupting it", task.get_name(), grace)
            task.cancel()
        await asyncio.wait(pending, timeout=grace)
        for task in self._running_tasks():
            log.error("%s did not end; leaving it", task.get_name())

    def _running_tasks(self) -> set[asyncio.Task[None]]:
        return {j.task for j in self.jobs.values() if j.task is not None and not j.task.done()}


def _ignore_refusal(task: asyncio.Future[None]) -> None:
    """A job that is already ending refuses the cancel verb: nothing to do at shutdown."""
    if not task.cancelled() and isinstance(task.exception(), QmpError):
        return
    if not task.cancelled() and task.exception() is not None:
        log.error("cancelling a job at shutdown failed: %r", task.exception())
