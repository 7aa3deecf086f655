"""The daemon: owns the graph, the jobs, the QMP server and whatever subsystems register
(NBD), and shuts them down in order (qemu-storage-daemon's main loop and exit path)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from blockd.block.graph import BlockGraph
from blockd.io import pool
from blockd.job.manager import JobManager
from blockd.qapi.base import ArgsValidator
from blockd.qmp import registry
from blockd.qmp.server import QmpServer

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, socket_path: str) -> None:
        registry.load_all()
        self.socket_path = socket_path
        self.graph = BlockGraph()
        self.jobs = JobManager(self.emit)
        self.qmp = QmpServer(self, socket_path)
        #: Subsystems keep their state here (e.g. "nbd" -> the NBD server).
        self.services: dict[str, Any] = {}
        #: Run at shutdown, last registered first, before the graph is closed.
        self.shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
        self._quit = asyncio.Event()
        #: QMP commands run one at a time across all sessions, as QEMU's single dispatcher
        #: coroutine runs them: a command that awaits I/O half-way (blockdev-del storing
        #: bitmaps, a transaction) is never interleaved with another client's command.
        self.monitor_lock = asyncio.Lock()

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """Send an event to every negotiated QMP session."""
        self.qmp.broadcast(name, data)

    def request_quit(self) -> None:
        self._quit.set()

    async def add_blockdev(self, options: dict[str, Any]) -> None:
        """``--blockdev JSON`` on the command line: the same as ``blockdev-add``."""
        from blockd.qapi.block import BlockdevOptions

        await self.graph.add(ArgsValidator(BlockdevOptions).validate(options))

    async def serve(self, blockdevs: list[dict[str, Any]] | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_quit)
        await self.qmp.start()  # first: a live daemon on the path means we touch nothing
        try:
            for spec in blockdevs or []:
                await self.add_blockdev(spec)
            self.qmp.ready.set()
            await self._quit.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Cancel jobs, stop services, flush and close every node, remove the socket."""
        log.info("shutting down")
        try:
            await self.jobs.cancel_all()
        except Exception:
            log.exception("cancelling jobs at shutdown")
        for hook in reversed(self.shutdown_hooks):
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        await self.graph.close_all()
        await self.qmp.stop()
        pool.shutdown()
