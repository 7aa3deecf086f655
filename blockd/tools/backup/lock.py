"""Locks on a backup directory (``flock``, so a killed process never leaves one behind).

Two locks, because readers and writers conflict differently:

- ``.writer.lock`` — held exclusively by ``backup`` and ``prune``: no two runs at once.
- ``.readers.lock`` — held shared by ``verify``, ``restore`` and ``serve``, exclusively by
  ``prune``. A backup only adds files, so it can run while an old point is restored or
  served; a prune rewrites layers, so it waits for no reader and no reader waits for it: the
  loser is told who holds the directory.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from blockd.tools.backup.errors import EXIT_LOCKED, ToolError

WRITER = ".writer.lock"
READERS = ".readers.lock"


class DirLock:
    def __init__(self, directory: Path, name: str, exclusive: bool) -> None:
        self.path = directory / name
        self.exclusive = exclusive
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            # The pid in the file is the last exclusive holder's: only that kind blocks us
            # when we want a shared lock or the writer lock.
            shared_holders = self.exclusive and self.path.name == READERS
            holder = "" if shared_holders else _holder(fd)
            os.close(fd)
            what = "a backup or prune" if self.path.name == WRITER else "a prune, restore or serve"
            raise ToolError(
                f"{self.path.parent} is in use by {what}{holder}; try again when it is done",
                EXIT_LOCKED,
            ) from None
        if self.exclusive:
            # Only for the message another process prints; the lock itself is the flock.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def writer(directory: Path) -> DirLock:
    return DirLock(directory, WRITER, exclusive=True)


def readers(directory: Path, exclusive: bool = False) -> DirLock:
    return DirLock(directory, READERS, exclusive=exclusive)
