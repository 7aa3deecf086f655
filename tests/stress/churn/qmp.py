"""A small asyncio QMP client for the stress clients: commands matched to answers by id, job
end events kept per job, and the one exception every client stops on when the daemon dies.

Raw sockets rather than qemu.qmp: sixteen and more of these run in one event loop, each sees
every event of every other client's jobs, and a ``kill -9`` must end each of them with one
predictable exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from pathlib import Path
from typing import Any

#: Events that end a block job, and the one that says it waits for job-finalize.
JOB_END = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
JOB_PENDING = "BLOCK_JOB_PENDING"


class DaemonGone(Exception):
    """The QMP connection closed under a command."""


class Qmp:
    def __init__(self, sock: Path, tag: str, internal: list[str]) -> None:
        self.sock = sock
        self.tag = tag
        #: Where "Internal error" answers are reported (shared by every client of a run).
        self.internal = internal
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        #: Job events by (kind, job id), kind "end" or "pending", for the jobs whose id
        #: starts with ``job_prefix``.
        self.job_prefix = f"{tag}-"
        self._job_events: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}
        #: The last JOB_STATUS_CHANGE of each such job.
        self.job_status: dict[str, str] = {}
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.gone = False

    async def connect(self) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self.sock), limit=1 << 24)
        self._writer = writer
        json.loads(await reader.readline())  # greeting
        self._reader = asyncio.create_task(self._read(reader))
        r = await self.cmd("qmp_capabilities")
        assert "return" in r, r

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "event" in msg:
                    self._event(msg)
                    continue
                fut = self._pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            self.gone = True
            for fut in [*self._pending.values(), *self._job_events.values()]:
                if not fut.done():
                    fut.set_exception(DaemonGone(self.tag))
                    fut.exception()  # nobody may wait for it any more: no warning then
            self._pending.clear()

    def _event(self, msg: dict[str, Any]) -> None:
        if msg["event"] == "JOB_STATUS_CHANGE":
            data = msg["data"]
            if str(data["id"]).startswith(self.job_prefix):
                self.job_status[data["id"]] = data["status"]
            return
        name = msg["event"]
        kind = "end" if name in JOB_END else "pending" if name == JOB_PENDING else ""
        job = str(msg["data"].get("device", msg["data"].get("id", "")))
        if kind and job.startswith(self.job_prefix):
            fut = self._job_future(kind, job)
            if not fut.done():
                fut.set_result(msg)

    def _job_future(self, kind: str, job: str) -> asyncio.Future[dict[str, Any]]:
        fut = self._job_events.get((kind, job))
        if fut is None:
            fut = self._job_events[kind, job] = asyncio.get_running_loop().create_future()
        return fut

    async def cmd(self, execute: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command and wait for its answer; ``DaemonGone`` if the daemon died."""
        if self.gone or self._writer is None:
            raise DaemonGone(self.tag)
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        msg: dict[str, Any] = {"execute": execute, "id": rid}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._writer.write(json.dumps(msg).encode())
            await self._writer.drain()
        except (ConnectionError, OSError):
            self._pending.pop(rid, None)
            raise DaemonGone(self.tag) from None
        reply = await fut
        err = reply.get("error")
        if err is not None and str(err.get("desc", "")).startswith("Internal error"):
            self.internal.append(f"{self.tag}: {execute} {msg.get('arguments')}: {err['desc']}")
        return reply

    def ended(self, job: str) -> bool:
        """Whether the end event of *job* arrived (before any answer read after it)."""
        fut = self._job_events.get(("end", job))
        return fut is not None and fut.done()

    async def job_end(self, job: str, timeout: float) -> dict[str, Any]:
        """The BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED event of *job*."""
        return await asyncio.wait_for(asyncio.shield(self._job_future("end", job)), timeout)

    async def job_pending_or_end(self, job: str, timeout: float) -> dict[str, Any]:
        """BLOCK_JOB_PENDING of *job*, or its end event if it ended without waiting."""
        futs = {self._job_future("pending", job), self._job_future("end", job)}
        done, _ = await asyncio.wait(futs, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            raise TimeoutError(f"{job} neither pending nor ended")
        return next(iter(done)).result()
