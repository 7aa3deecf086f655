"""The QMP listener: one Unix socket, any number of sessions, and the event fan-out."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from blockd.qmp.framing import encode
from blockd.qmp.session import QmpSession

if TYPE_CHECKING:
    from blockd.daemon import Daemon

log = logging.getLogger(__name__)


class SocketInUseError(Exception):
    """Another live daemon answers on the socket path."""


def claim_socket_path(path: str) -> None:
    """Remove a stale socket file; refuse when a live daemon still answers there."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        raise
    else:
        raise SocketInUseError(path)
    finally:
        probe.close()


class QmpServer:
    def __init__(self, daemon: Daemon, path: str) -> None:
        self.daemon = daemon
        self.path = path
        self.sessions: set[QmpSession] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._listening = False
        #: Set once the command line's --blockdev nodes are open. Sessions wait for it before
        #: their greeting: QSD runs no command before its whole command line is processed, and
        #: a client that connects the moment the socket appears must find those nodes.
        self.ready = asyncio.Event()

    async def start(self) -> None:
        claim_socket_path(self.path)
        old = os.umask(0o177)  # the socket is born 0600: QMP is full control of the host's images
        try:
            self._server = await asyncio.start_unix_server(self._accept, path=self.path)
            self._listening = True
        finally:
            os.umask(old)
        log.info("QMP listening on %s", self.path)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = QmpSession(self.daemon, reader, writer)
        self.sessions.add(session)
        log.info("qmp#%d connected", session.num)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self.ready.wait()
            await session.run()
        except asyncio.CancelledError:
            # Shutdown cancels sessions on purpose; ending quietly keeps Python 3.11's
            # StreamReaderProtocol callback from logging the cancellation as a crash.
            pass
        finally:
            self.sessions.discard(session)
            if task is not None:
                self._tasks.discard(task)
            log.info("qmp#%d disconnected", session.num)

    def broadcast(self, name: str, data: dict[str, Any]) -> None:
        now = time.time()
        seconds = int(now)
        msg = {
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
            "event": name,
            "data": data,
        }
        raw = encode(msg)
        log.info("event %s %s", name, data)
        for session in list(self.sessions):
            if session.receives_events:
                session.send_raw(raw)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for session in list(self.sessions):
            session.close()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._listening:
            self._listening = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
