"""The job state machine in-process: every verb in every state it can be seen in, QEMU's
texts, transaction completion order. The job types here are small real jobs (they tick and
sleep at pause points); the block jobs (backup, mirror...) are tested end to end elsewhere."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from blockd.errors import QmpError
from blockd.job.blockjob import BlockJob
from blockd.job.core import VERBS, JobTxn
from blockd.job.manager import JobManager
from blockd.qapi.job import JobStatus, JobType, JobVerb


class TickJob(BlockJob):
    job_type = JobType.BACKUP

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        *,
        ticks: int = 1000,
        fail_at: int = -1,
        become_ready: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(manager, job_id, **kw)
        self.ticks = ticks
        self.fail_at = fail_at
        self.become_ready = become_ready
        self.completed = False
        self.progress_total = ticks

    async def run(self) -> None:
        for i in range(self.ticks):
            if i == self.fail_at:
                raise OSError(5, "injected")
            await self.sleep(0.002)
            self.progress_current = i + 1
        if self.become_ready:
            self.emit_ready()
            while not self.completed and not self.cancelled:
                await self.sleep(0.01)

    async def on_complete(self) -> None:
        self.completed = True
        self.enter()

    def on_cancel(self, force: bool) -> bool:
        return force or not self.is_ready


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, data: dict[str, Any]) -> None:
        self.events.append((name, data))

    def names(self) -> list[str]:
        return [
            f"J:{d['id']}:{d['status']}"
            if n == "JOB_STATUS_CHANGE"
            else f"{n}:{d.get('device', d.get('id'))}"
            for n, d in self.events
        ]


async def until(pred: Any, timeout: float = 5) -> None:
    for _ in range(int(timeout / 0.005)):
        if pred():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def expect_refused(job: Any, verb: JobVerb) -> None:
    with pytest.raises(QmpError) as ei:
        if verb == JobVerb.PAUSE:
            job.user_pause()
        elif verb == JobVerb.SET_SPEED:
            job.set_speed(1)
        elif verb == JobVerb.DISMISS:
            job.user_dismiss()
        else:
            coro = {
                JobVerb.CANCEL: lambda: job.user_cancel(False),
                JobVerb.COMPLETE: job.user_complete,
                JobVerb.FINALIZE: job.user_finalize,
            }[verb]()
            coro.send(None)
    assert ei.value.desc == (
        f"Job '{job.id}' in state '{job.status.value}' cannot accept command verb '{verb.value}'"
    )


async def check_state(job: Any, state: JobStatus) -> None:
    assert job.status == state
    for verb in (
        JobVerb.CANCEL,
        JobVerb.PAUSE,
        JobVerb.SET_SPEED,
        JobVerb.COMPLETE,
        JobVerb.FINALIZE,
        JobVerb.DISMISS,
    ):
        if state not in VERBS[verb]:
            expect_refused(job, verb)


async def test_verbs_refused_in_every_state() -> None:
    rec = Recorder()
    m = JobManager(rec)
    # created: in a transaction not started yet
    j = TickJob(m, "c0")
    j.create()
    await check_state(j, JobStatus.CREATED)
    # running
    r = TickJob(m, "r0", auto_finalize=False, auto_dismiss=False, ticks=30)
    r.create()
    r.start()
    await check_state(r, JobStatus.RUNNING)
    # paused
    r.user_pause()
    await until(lambda: r.status == JobStatus.PAUSED)
    await check_state(r, JobStatus.PAUSED)
    with pytest.raises(QmpError, match="Job is already paused"):
        r.user_pause()
    r.user_resume()
    # pending (auto-finalize off)
    await until(lambda: r.status == JobStatus.PENDING)
    await check_state(r, JobStatus.PENDING)
    with pytest.raises(QmpError, match="Can't resume a job that was not paused"):
        r.user_resume()
    await r.user_finalize()
    # concluded (auto-dismiss off)
    await check_state(r, JobStatus.CONCLUDED)
    r.user_dismiss()
    assert "r0" not in m.jobs
    # ready and standby
    rd = TickJob(m, "rd0", ticks=2, become_ready=True)
    rd.create()
    rd.start()
    await until(lambda: rd.status == JobStatus.READY)
    await check_state(rd, JobStatus.READY)
    rd.user_pause()
    await until(lambda: rd.status == JobStatus.STANDBY)
    await check_state(rd, JobStatus.STANDBY)
    await rd.user_complete()  # allowed in standby, as in QEMU
    rd.user_resume()
    await until(lambda: "rd0" not in m.jobs)
    # waiting: first job of a grouped pair finished, the other still running
    txn = JobTxn()
    a = TickJob(m, "wa", ticks=1)
    b = TickJob(m, "wb", ticks=200)
    a.create(txn)
    b.create(txn)
    a.start()
    b.start()
    await until(lambda: a.status == JobStatus.WAITING)
    await check_state(a, JobStatus.WAITING)
    await until(lambda: "wa" not in m.jobs and "wb" not in m.jobs, timeout=10)
    await j.user_cancel(True)
    assert "c0" not in m.jobs
    assert rec.names()[-3:] == ["J:c0:aborting", "J:c0:concluded", "J:c0:null"]


async def test_success_event_order_matches_qsd_backup() -> None:
    rec = Recorder()
    m = JobManager(rec)
    j = TickJob(m, "j", ticks=3)
    j.create()
    j.start()
    await j.wait()
    assert rec.names() == [
        "J:j:created",
        "J:j:running",
        "J:j:waiting",
        "J:j:pending",
        "BLOCK_JOB_COMPLETED:j",
        "J:j:concluded",
        "J:j:null",
    ]
    completed = rec.events[4][1]
    assert completed == {"type": "backup", "device": "j", "len": 3, "offset": 3, "speed": 0}


async def test_failure_reports_error_and_skips_pending() -> None:
    rec = Recorder()
    m = JobManager(rec)
    j = TickJob(m, "f", ticks=10, fail_at=2, auto_finalize=False, auto_dismiss=False)
    j.create()
    j.start()
    await j.wait()
    assert rec.names() == [
        "J:f:created",
        "J:f:running",
        "J:f:aborting",
        "BLOCK_JOB_COMPLETED:f",
        "J:f:concluded",
    ]
    assert rec.events[3][1]["error"] == "Input/output error"
    assert j.block_info()["error"] == "Input/output error"


async def test_cancel_of_user_paused_job_resumes_first() -> None:
    rec = Recorder()
    m = JobManager(rec)
    j = TickJob(m, "p", ticks=1000, auto_dismiss=False)
    j.create()
    j.start()
    j.user_pause()
    await until(lambda: j.status == JobStatus.PAUSED)
    await j.user_cancel(True)
    await j.wait()
    assert rec.names()[-5:] == [
        "J:p:paused",
        "J:p:running",
        "J:p:aborting",
        "BLOCK_JOB_CANCELLED:p",
        "J:p:concluded",
    ]
    assert j.info()["error"] == "Operation canceled"


async def test_soft_cancel_of_ready_job_completes() -> None:
    rec = Recorder()
    m = JobManager(rec)
    j = TickJob(m, "m", ticks=1, become_ready=True)
    j.create()
    j.start()
    await until(lambda: j.status == JobStatus.READY)
    await j.user_cancel(False)
    await j.wait()
    assert rec.names()[-6:] == [
        "BLOCK_JOB_READY:m",
        "J:m:waiting",
        "J:m:pending",
        "BLOCK_JOB_COMPLETED:m",
        "J:m:concluded",
        "J:m:null",
    ]


async def test_grouped_failure_cancels_the_rest_in_txn_order() -> None:
    rec = Recorder()
    m = JobManager(rec)
    txn = JobTxn()
    good = TickJob(m, "good", ticks=500)
    bad = TickJob(m, "bad", ticks=500, fail_at=3)
    good.create(txn)
    bad.create(txn)
    good.start()
    bad.start()
    await good.wait()
    await bad.wait()
    tail = [n for n in rec.names() if "running" not in n and "created" not in n]
    assert tail == [
        "J:bad:aborting",
        "BLOCK_JOB_COMPLETED:bad",
        "J:bad:concluded",
        "J:bad:null",
        "J:good:aborting",
        "BLOCK_JOB_CANCELLED:good",
        "J:good:concluded",
        "J:good:null",
    ]


async def test_set_speed_and_job_id_rules() -> None:
    m = JobManager(Recorder())
    for bad in ["", "1abc", "x 15"]:
        with pytest.raises(QmpError, match=f"Invalid job ID '{bad}'"):
            m.check_new_id(bad)
    j = TickJob(m, "s", ticks=5)
    j.create()
    with pytest.raises(QmpError, match="Job ID 's' already in use"):
        m.check_new_id("s")
    with pytest.raises(QmpError, match="expects a non-negative value"):
        j.set_speed(-1)
    j.set_speed(1 << 20)
    assert j.block_info()["speed"] == 1 << 20
    await j.user_cancel(True)
