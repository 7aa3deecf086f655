"""The daemon: owns the graph, the jobs, the QMP server and whatever subsystems register
(NBD), and shuts them down in order (qemu-storage-daemon's main loop and exit path)."""

from __future__ import annotations

import asyncio
import faulthandler
import io
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from blockd.block.graph import BlockGraph
from blockd.errors import QmpError
from blockd.io import pool
from blockd.job.manager import JobManager
from blockd.qapi.base import ArgsValidator
from blockd.qmp import registry
from blockd.qmp.server import QmpServer

log = logging.getLogger(__name__)

# Bounds of each shutdown step, in seconds (quit, SIGTERM, SIGINT, SIGHUP).
#: Each subsystem's shutdown hook (the NBD server closing its connections).
HOOK_TIMEOUT = 5.0
#: Each node's flush and close, bitmap storing included.
NODE_CLOSE_TIMEOUT = 10.0
#: I/O threads still inside a system call (they are daemon threads: exit does not wait).
POOL_JOIN_TIMEOUT = 2.0


def log_stacks() -> None:
    """Every asyncio task and where it waits (SIGUSR1)."""
    for task in asyncio.all_tasks():
        buf = io.StringIO()
        task.print_stack(limit=12, file=buf)
        log.warning("%s", buf.getvalue().rstrip())


class BlockdevOpenError(Exception):
    """The *index*-th ``--blockdev`` could not be opened."""

    def __init__(self, index: int, error: QmpError) -> None:
        super().__init__(error.desc)
        self.index = index
        self.error = error


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
        # SIGHUP too: closing the terminal must not kill the daemon without storing the
        # bitmaps and removing the socket (qemu-storage-daemon also exits cleanly on it).
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.request_quit)
        # A daemon that stops answering can be asked where it waits: ``kill -USR1`` logs every
        # task's coroutine stack and, even with the event loop blocked, every thread's stack.
        loop.add_signal_handler(signal.SIGUSR1, log_stacks)
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)
        # The socket first: a live daemon on the path means we touch nothing, not even the
        # images. Clients that connect meanwhile wait until the --blockdev nodes are open.
        await self.qmp.bind()
        try:
            for i, spec in enumerate(blockdevs or []):
                try:
                    await self.add_blockdev(spec)
                except QmpError as exc:
                    raise BlockdevOpenError(i, exc) from None
            await self.qmp.start()
            await self._quit.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        """Cancel commands and jobs, stop services, flush and close every node (storing
        persistent bitmaps), remove the socket. Every wait is bounded: a command, job or node
        stuck on a server that stopped answering is given up on, not waited for."""
        log.info("shutting down")
        self.qmp.close_listener()
        await self.qmp.cancel_commands()
        try:
            await self.jobs.cancel_all()  # bounded: see CANCEL_GRACE
        except Exception:
            log.exception("cancelling jobs at shutdown")
        for hook in reversed(self.shutdown_hooks):
            try:
                await asyncio.wait_for(hook(), HOOK_TIMEOUT)
            except TimeoutError:
                log.error("shutdown hook %s did not end in %.0f s", hook, HOOK_TIMEOUT)
            except Exception:
                log.exception("shutdown hook failed")
        await self.graph.close_all(NODE_CLOSE_TIMEOUT)
        await self.qmp.stop()
        pool.shutdown(POOL_JOIN_TIMEOUT)
