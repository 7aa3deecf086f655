"""The ``blockdev-create`` job (QEMU's block/create.c): runs a driver's create function as a
job of type ``create``. It is not a block job: no BLOCK_JOB_* events, invisible to
``query-block-jobs``, dismissed by hand."""

from __future__ import annotations

from typing import Any

from blockd.block.driver import driver_class
from blockd.errors import QmpError
from blockd.job.core import Job
from blockd.job.joblog import JobLog, fmt_bytes
from blockd.qapi.job import JobType


class CreateJob(Job):
    job_type = JobType.CREATE

    def __init__(self, manager: Any, job_id: str, options: Any, graph: Any) -> None:
        super().__init__(manager, job_id, auto_finalize=True, auto_dismiss=False)
        self.options = options
        self.graph = graph
        self.progress_total = 1
        self.joblog = JobLog(job_id, "create")

    def start(self) -> None:
        opts = self.options
        what = [f"driver={opts.driver.value}"]
        for key in ("filename", "file", "size"):
            value = getattr(opts, key, None)
            if isinstance(value, int):
                value = fmt_bytes(value)
            elif value is not None and not isinstance(value, str):
                value = getattr(value, "node_name", None) or "(inline)"
            if value is not None:
                what.append(f"{key}={value!r}" if key == "filename" else f"{key}={value}")
        self.joblog.started(", ".join(what))
        super().start()

    def on_finalized_event(self) -> None:
        if self.ret:
            self.joblog.ended("failed", None, self.error)
        else:
            self.joblog.ended("completed", None)

    async def run(self) -> None:
        driver = self.options.driver.value
        cls = driver_class(driver)
        if cls is None or not cls.can_create:
            raise QmpError("Driver does not support blockdev-create")
        try:
            await cls.create(self.options, self.graph)
        finally:
            self.progress_current = 1  # QEMU reports 1/1 whatever the outcome
