"""The QMP listener: one Unix socket, any number of sessions, and the event fan-out."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import time
from typing import TYPE_CHECKING, Any

from blockd.net.sockets import UNIX_PATH_MAX
from blockd.qmp.framing import encode
from blockd.qmp.session import QmpSession

if TYPE_CHECKING:
    from blockd.daemon import Daemon

log = logging.getLogger(__name__)


class SocketInUseError(Exception):
    """Another live daemon answers on the socket path."""


class SocketPathError(Exception):
    """The socket path cannot be used; the text is one line, QEMU's where it has one."""


#: Seconds the commands cancelled at shutdown get to end (they are then left behind).
COMMAND_GRACE = 2.0


def claim_socket_path(path: str) -> None:
    """Make *path* free for a new socket: remove a stale socket, refuse when a live daemon
    still answers there, and never remove anything that is not a socket (QSD unlinks
    whatever is at the path, a regular file or a symlink included)."""
    if len(os.fsencode(path)) >= UNIX_PATH_MAX:
        raise SocketPathError(
            f"UNIX socket path '{path}' is too long: Path must be less than {UNIX_PATH_MAX} bytes"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SocketPathError(f"Failed to bind socket to {path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise SocketPathError(f"Failed to unlink socket {path}: Is a directory")
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket: not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        raise SocketPathError(f"Failed to connect to {path}: {exc.strerror}") from None
    else:
        raise SocketInUseError(path)
    finally:
        probe.close()


def _bind_private(path: str) -> socket.socket:
    """A listening socket born 0600: QMP is full control of the host's images."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise SocketPathError(f"Failed to bind socket to {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    return sock


class QmpServer:
    def __init__(self, daemon: Daemon, path: str) -> None:
        self.daemon = daemon
        self.path = path
        self.sessions: set[QmpSession] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: (st_dev, st_ino) of the socket this daemon bound, so that only it is removed.
        self._bound: tuple[int, int] | None = None

    async def bind(self) -> None:
        """Take the socket path; clients that connect now wait until :meth:`start`."""
        claim_socket_path(self.path)
        sock = _bind_private(self.path)
        st = os.stat(self.path)
        self._bound = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._accept, sock=sock, start_serving=False)

    async def start(self) -> None:
        if self._server is None:
            await self.bind()
        assert self._server is not None
        await self._server.start_serving()
        log.info("QMP listening on %s", self.path)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = QmpSession(self.daemon, reader, writer)
        self.sessions.add(session)
        log.info("qmp#%d connected", session.num)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
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
        # Debug only: jobs log their own start and end lines (blockd.job.joblog).
        log.debug("event %s %s", name, data)
        for session in list(self.sessions):
            if session.receives_events:
                session.send_raw(raw)

    def close_listener(self) -> None:
        """Accept no more clients (shutdown); sessions already open go on."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def cancel_commands(
        self, timeout: float = COMMAND_GRACE, keep: QmpSession | None = None
    ) -> None:
        """Shutdown: cancel the commands of every session but *keep* (a ``blockdev-add`` of
        an NBD node retrying its connection, say) and wait at most *timeout* for them."""
        workers = [s.worker for s in self.sessions if s.worker is not None and s is not keep]
        await _cancel_and_wait(workers, timeout)

    async def stop(self, timeout: float = 5.0) -> None:
        self.close_listener()
        for session in list(self.sessions):
            session.close()
        await _cancel_and_wait(list(self._tasks), timeout)
        if self._bound is not None:
            bound, self._bound = self._bound, None
            try:
                st = os.lstat(self.path)
            except OSError:
                return
            if (st.st_dev, st.st_ino) == bound:
                os.unlink(self.path)


async def _cancel_and_wait(tasks: list[asyncio.Task[None]], timeout: float) -> None:
    tasks = [t for t in tasks if t is not asyncio.current_task() and not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        _done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            log.warning("%s did not end in %.0f s; leaving it", t.get_name(), timeout)
