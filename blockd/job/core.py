"""The job core: QEMU's job state machine, verbs, pause points and completion
(QEMU's job.c, whose tables are reproduced here as data).

A job is a coroutine (:meth:`Job.run`) wrapped by this class. Every state change goes through
:meth:`Job._transition`, which checks the transition table and emits ``JOB_STATUS_CHANGE``.
Completion follows QEMU: a job that succeeds waits for the rest of its transaction, then all go
``pending`` and are finalized together; a failure aborts the whole transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

from blockd.errors import QmpError, errno_of, strerror
from blockd.qapi.job import JobStatus as S
from blockd.qapi.job import JobType, JobVerb

if TYPE_CHECKING:
    from blockd.job.manager import JobManager

log = logging.getLogger(__name__)

TRANSITIONS: dict[S, frozenset[S]] = {
    S.UNDEFINED: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.READY: frozenset({S.STANDBY, S.WAITING, S.ABORTING}),
    S.STANDBY: frozenset({S.READY}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.ABORTING: frozenset({S.ABORTING, S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}

_LIVE = {S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY}
VERBS: dict[JobVerb, frozenset[S]] = {
    JobVerb.CANCEL: frozenset(_LIVE | {S.WAITING, S.PENDING}),
    JobVerb.PAUSE: frozenset(_LIVE),
    JobVerb.RESUME: frozenset(_LIVE),
    JobVerb.SET_SPEED: frozenset(_LIVE),
    JobVerb.COMPLETE: frozenset({S.READY, S.STANDBY}),
    JobVerb.FINALIZE: frozenset({S.PENDING}),
    JobVerb.DISMISS: frozenset({S.CONCLUDED}),
    JobVerb.CHANGE: frozenset(_LIVE),
}

_COMPLETED = {S.WAITING, S.PENDING, S.ABORTING, S.CONCLUDED, S.NULL}


class JobCancelled(Exception):
    """Raised at a pause point of a force-cancelled job; the job ends with ECANCELED."""


class JobTxn:
    """The jobs that complete together (QEMU's JobTxn). A lone job has a txn of its own.

    Jobs are kept newest first, as QEMU inserts them at the head of its list; events of a
    grouped abort come out in that order.
    """

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.aborting = False
        #: Set while the jobs are being finalized or aborted. QEMU does that without
        #: yielding; here the commit/abort/clean hooks await I/O, so verbs that arrive
        #: meanwhile wait for the end and then see the final state (never a half-finalized
        #: job that could be finalized or cancelled a second time).
        self._settling = 0
        self._settled = asyncio.Event()
        self._settled.set()

    @contextlib.asynccontextmanager
    async def settling(self) -> AsyncIterator[None]:
        self._settling += 1
        self._settled.clear()
        try:
            yield
        finally:
            self._settling -= 1
            if not self._settling:
                self._settled.set()

    @property
    def is_settling(self) -> bool:
        return self._settling > 0

    async def wait_settled(self) -> None:
        while self._settling:
            await self._settled.wait()

    def add(self, job: Job) -> None:
        self.jobs.insert(0, job)
        job.txn = self


class Job:
    """Base of every job. Subclasses implement :meth:`run` and the finalization hooks.

    **Runs in:** the event loop; :meth:`run` is a task of its own.
    """

    job_type: ClassVar[JobType]
    is_block_job: ClassVar[bool] = False

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        *,
        auto_finalize: bool = True,
        auto_dismiss: bool = True,
    ) -> None:
        self.manager = manager
        self.id = job_id
        self.status = S.UNDEFINED
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.progress_current = 0
        self.progress_total = 0
        self.ret = 0
        self.error: str | None = None
        self.cancelled = False  # cancel requested
        self.force_cancel = False
        self.user_paused = False
        self.pause_count = 0
        self.paused = False
        self.busy = False
        self.started = False
        self.deferred = False  # run() has returned
        self.txn: JobTxn | None = None
        self._wake = asyncio.Event()
        self._finished = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._pause_prev = S.RUNNING

    # -- state ---------------------------------------------------------------------------
    def _transition(self, new: S) -> None:
        old = self.status
        if new not in TRANSITIONS[old]:
            raise AssertionError(f"job {self.id}: illegal transition {old} -> {new}")
        self.status = new
        log.debug("job %s: %s -> %s", self.id, old, new)
        if old != new:
            self.manager.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": new.value})

    def check_verb(self, verb: JobVerb) -> None:
        if self.status not in VERBS[verb]:
            raise QmpError(
                f"Job '{self.id}' in state '{self.status.value}' cannot accept command verb "
                f"'{verb.value}'"
            )

    @property
    def is_completed(self) -> bool:
        return self.status in _COMPLETED

    @property
    def is_ready(self) -> bool:
        return self.status in (S.READY, S.STANDBY)

    # -- hooks for job types -------------------------------------------------------------
    async def run(self) -> None:
        """The job's work. Raise to fail (errno from OSError), call pause points often."""
        raise NotImplementedError

    async def prepare(self) -> None:
        """First step of a successful finalization; raising turns success into failure."""

    async def commit(self) -> None:
        """Make the result visible (pivot, bitmap merge). Must not fail."""

    async def abort(self) -> None:
        """Undo everything after a failure or cancel. Must not fail."""

    async def clean(self) -> None:
        """Release resources, after commit or abort."""

    def on_cancel(self, force: bool) -> bool:
        """A cancel was requested; return whether it is a force cancel (default: always)."""
        return True

    async def on_complete(self) -> None:
        """``job-complete`` on a ready job; default: cannot be completed."""
        raise QmpError(f"The active block job '{self.id}' cannot be completed")

    def on_finalized_event(self) -> None:
        """Emit the job type's completion event (block jobs: BLOCK_JOB_COMPLETED/CANCELLED)."""

    def on_pending_event(self) -> None:
        """Emit BLOCK_JOB_PENDING for block jobs with auto-finalize off."""

    # -- running -------------------------------------------------------------------------
    def create(self, txn: JobTxn | None = None) -> None:
        """Register the job (``created``); it runs once :meth:`start` is called."""
        self.manager.register(self)
        (txn or JobTxn()).add(self)
        self._transition(S.CREATED)

    def start(self) -> None:
        self.started = True
        self.busy = True
        self._transition(S.RUNNING)
        self.task = asyncio.create_task(self._main(), name=f"job-{self.id}")

    async def _main(self) -> None:
        try:
            await self.pause_point()
            await self.run()
        except JobCancelled:
            self.ret = -errno.ECANCELED
        except asyncio.CancelledError:
            self.ret = -errno.ECANCELED
            self.cancelled = self.force_cancel = True
        except QmpError as exc:
            self.ret = -errno.EINVAL
            self.error = exc.desc
        except Exception as exc:
            err = errno_of(exc)
            if not isinstance(exc, OSError):
                log.exception("job %s failed", self.id)
            self.ret = -err
            if not isinstance(exc, OSError):
                self.error = str(exc) or strerror(err)
        finally:
            self.busy = False
            self.deferred = True
        try:
            await self._completed()
        except Exception:
            log.exception("job %s: completion failed", self.id)

    def _update_rc(self) -> None:
        if not self.ret and self.force_cancel:
            self.ret = -errno.ECANCELED
        if self.ret:
            if self.error is None:
                self.error = strerror(-self.ret)
            if self.status != S.ABORTING:
                self._transition(S.ABORTING)

    async def _completed(self) -> None:
        self._update_rc()
        if self.ret:
            await self._txn_abort()
        else:
            await self._txn_success()

    async def _txn_success(self) -> None:
        txn = self.txn
        assert txn is not None
        self._transition(S.WAITING)
        if any(not j.is_completed for j in txn.jobs):
            return
        for j in list(txn.jobs):
            j._transition(S.PENDING)
            if not j.auto_finalize:
                j.on_pending_event()
        if all(j.auto_finalize for j in txn.jobs):
            await self.do_finalize()

    async def do_finalize(self) -> None:
        txn = self.txn
        assert txn is not None
        async with txn.settling():
            await self._do_finalize(txn)

    async def _do_finalize(self, txn: JobTxn) -> None:
        for j in list(txn.jobs):
            if j.ret == 0:
                try:
                    await j.prepare()
                except Exception as exc:
                    j.ret = -errno_of(exc)
                    j.error = exc.desc if isinstance(exc, QmpError) else None
                    j._update_rc()
                    await j._txn_abort()
                    return
        for j in list(txn.jobs):
            await j._finalize_single()

    async def _txn_abort(self) -> None:
        txn = self.txn
        assert txn is not None
        if txn.aborting:
            return
        txn.aborting = True
        async with txn.settling():
            await self._abort_members(txn)

    async def _abort_members(self, txn: JobTxn) -> None:
        for other in txn.jobs:
            if other is not self:
                other.cancel_async(force=True)
        while txn.jobs:
            j = txn.jobs[0]
            if not j.is_completed:
                await j._finished_run()
            await j._finalize_single()

    async def _finished_run(self) -> None:
        """Wait until :meth:`run` has returned. Its own completion handling finds the txn
        aborting and leaves the finalization to the job that aborts it."""
        if self.task is None or self.task is asyncio.current_task():
            self.deferred = True
            self._update_rc()
            return
        await asyncio.wait({self.task})

    async def _finalize_single(self) -> None:
        txn = self.txn
        self._update_rc()
        try:
            if self.ret == 0:
                await self.commit()
            else:
                await self.abort()
        finally:
            try:
                await self.clean()
            finally:
                if self.started:
                    self.on_finalized_event()
                if txn is not None and self in txn.jobs:
                    txn.jobs.remove(self)
                self._transition(S.CONCLUDED)
                self._finished.set()
                if self.auto_dismiss or not self.started:
                    self.dismiss()

    def dismiss(self) -> None:
        self._transition(S.NULL)
        self.manager.unregister(self)

    # -- pause points and sleeping -------------------------------------------------------
    async def pause_point(self) -> None:
        """Where the job may be paused or notice a force cancel."""
        if self.force_cancel:
            raise JobCancelled
        if self.pause_count > 0:
            prev = self.status
            self._pause_prev = prev
            self._transition(S.STANDBY if prev == S.READY else S.PAUSED)
            self.paused = True
            self.busy = False
            while self.pause_count > 0 and not self.force_cancel:
                self._wake.clear()
                await self._wake.wait()
            self.paused = False
            self.busy = True
            if self.status != prev:  # a cancel may already have moved us back
                self._transition(prev)
        if self.force_cancel:
            raise JobCancelled

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake early on resume or cancel (QEMU's job_sleep_ns)."""
        if seconds > 0 and not self.force_cancel:
            self.busy = False
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), seconds)
            except TimeoutError:
                pass
            self.busy = True
        await self.pause_point()

    def enter(self) -> None:
        """Wake the job if it sleeps or waits at a pause point."""
        self._wake.set()

    def drain_blip(self) -> None:
        """The paused/running pair QEMU emits when it drains a just-started job.

        Clients tolerate it; emitting it keeps blockd's event stream identical to
        qemu-storage-daemon's for backup start.
        """
        if self.status == S.RUNNING:
            self._transition(S.PAUSED)
            self._transition(S.RUNNING)

    # -- verbs -------------------------------------------------------------------------
    def user_pause(self) -> None:
        self.check_verb(JobVerb.PAUSE)
        if self.user_paused:
            raise QmpError("Job is already paused")
        self.user_paused = True
        self.pause()

    def pause(self) -> None:
        self.pause_count += 1

    async def after_user_pause(self) -> None:
        """QEMU's job_pause enters a job that sleeps, which then stops at its pause point
        before the command replies. Jobs with long idle sleeps (a mirror in sync) wake here
        and let the job get there first; others reach their pause point soon anyway."""
        if self.started and not self.busy and not self.paused and not self.deferred:
            self.enter()
            for _ in range(20):
                if self.paused or self.deferred:
                    return
                await asyncio.sleep(0)

    def user_resume(self) -> None:
        if not self.user_paused:
            raise QmpError("Can't resume a job that was not paused")
        self.check_verb(JobVerb.RESUME)
        self.on_user_resume()
        self.user_paused = False
        self.resume()

    def on_user_resume(self) -> None:
        """Hook: block jobs reset their io-status here."""

    def resume(self) -> None:
        if self.pause_count > 0:
            self.pause_count -= 1
        if self.pause_count == 0:
            # QEMU re-enters the job at once, so 'running' precedes the command's reply.
            self._leave_paused_status()
            self.enter()

    def _leave_paused_status(self) -> None:
        """Show the status the job had before it paused, if it shows paused/standby."""
        if self.paused and self.status in (S.PAUSED, S.STANDBY):
            self._transition(self._pause_prev)

    def cancel_async(self, force: bool) -> None:
        if self.user_paused:
            self.on_user_resume()
            self.user_paused = False
            self.resume()
            # QEMU emits 'running' here, before 'aborting', even when another pause is still
            # held: a cancelled job does not stay paused.
            self._leave_paused_status()
        self.cancelled = True
        if not self.force_cancel:
            self.force_cancel = force
        self.enter()

    async def _settle(self) -> None:
        if self.txn is not None:
            await self.txn.wait_settled()

    async def user_cancel(self, force: bool) -> None:
        await self._settle()
        self.check_verb(JobVerb.CANCEL)
        force = self.on_cancel(force)
        self.cancel_async(force)
        if not self.started:
            self.deferred = True
            await self._completed()
        elif self.deferred and self.status in (S.WAITING, S.PENDING):
            self._update_rc()
            await self._txn_abort()

    async def user_complete(self) -> None:
        await self._settle()
        self.check_verb(JobVerb.COMPLETE)
        if self.cancelled:
            raise QmpError(f"The active block job '{self.id}' cannot be completed")
        await self.on_complete()

    async def user_finalize(self) -> None:
        await self._settle()
        self.check_verb(JobVerb.FINALIZE)
        await self.do_finalize()

    def user_dismiss(self) -> None:
        self.check_verb(JobVerb.DISMISS)
        self.dismiss()

    async def wait(self) -> None:
        """Until the job has concluded."""
        await self._finished.wait()

    # -- queries -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": self.job_type.value,
            "status": self.status.value,
            "current-progress": self.progress_current,
            "total-progress": self.progress_total,
        }
        if self.status == S.CONCLUDED and self.ret:
            out["error"] = self.error or strerror(-self.ret)
        return out
