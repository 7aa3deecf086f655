"""Short QMP sessions with the daemon, retried while its monitor is busy.

qemu-storage-daemon's monitor serves one client at a time: a second client's connect succeeds
(the kernel queues it) but no greeting comes until the first client leaves. blockd serves many
clients at once. The tool therefore never holds a session longer than a few commands (job
progress is polled, not waited for with events), and treats a greeting that does not come as
"busy": it closes, waits a little and tries again, up to ``busy_timeout``. A socket that is
missing or refuses is a daemon that is not there, which no waiting fixes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from blockd.tools.backup.errors import DaemonLost, DaemonUnreachable, QmpFailed

#: qemu.qmp logs failed connects at ERROR; the tool reports failures itself, in one line.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

_GONE = (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.EACCES)


class Session:
    """One negotiated connection; commands fail as :class:`QmpFailed` or :class:`DaemonLost`."""

    def __init__(self, client: QMPClient) -> None:
        self.client = client

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await self.client.execute(cmd, args)
        except ExecuteError as exc:
            raise QmpFailed(cmd, exc.error_class, str(exc)) from None
        except (QMPError, OSError, EOFError) as exc:
            raise DaemonLost(f"the daemon went away during {cmd} ({_why(exc)})") from None


class Monitor:
    """The daemon at *socket*, reached through short sessions.

    *say* receives one-line notices (the first time the monitor is found busy).
    """

    def __init__(
        self,
        socket: str,
        busy_timeout: float = 60.0,
        say: Callable[[str], None] | None = None,
        greeting_timeout: float = 0.5,
    ) -> None:
        self.socket = socket
        self.busy_timeout = busy_timeout
        self.greeting_timeout = greeting_timeout
        self.say = say or (lambda _msg: None)
        self._told_busy = False

    async def _connect(self) -> QMPClient:
        deadline = time.monotonic() + self.busy_timeout
        pause = 0.05
        while True:
            client = QMPClient("blockd-backup")
            try:
                await asyncio.wait_for(client.connect(self.socket), self.greeting_timeout)
                return client
            except TimeoutError:
                busy = True  # connected (queued) but no greeting: another client has it
            except ConnectError as exc:
                cause = exc.exc
                if isinstance(cause, OSError) and cause.errno in _GONE:
                    raise DaemonUnreachable(
                        f"no daemon answers on {self.socket} ({_why(cause)})"
                    ) from None
                # EAGAIN (listen queue full), a reset from a monitor that just dropped us
                busy = True
            with contextlib.suppress(Exception):
                await client.disconnect()
            if busy and not self._told_busy:
                self._told_busy = True
                self.say(f"the monitor at {self.socket} is busy (another client); waiting")
            if time.monotonic() + pause > deadline:
                raise DaemonUnreachable(
                    f"the monitor at {self.socket} stayed busy for {self.busy_timeout:g} s"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Session]:
        client = await self._connect()
        try:
            yield Session(client)
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """*cmd* in a session of its own."""
        async with self.session() as s:
            return await s.execute(cmd, args)


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectError):
        return _why(exc.exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
