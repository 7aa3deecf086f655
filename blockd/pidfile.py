"""``--pidfile``: a locked pid file that only its owner ever writes or removes (QEMU's
qemu_write_pidfile, without its two hazards: it follows a symlink planted at the path and
deletes the file the link points to at exit).

The lock is a POSIX record lock on the whole file, the kind QEMU takes, so blockd and
qemu-storage-daemon refuse each other's pid file too.
"""

from __future__ import annotations

import fcntl
import os
import stat


class PidFileError(Exception):
    """The pid file cannot be taken; the text is QEMU's (after ``cannot create PID file: ``)."""


class PidFile:
    """Held from :meth:`acquire` until :meth:`release`; the descriptor keeps the lock."""

    def __init__(self, path: str, fd: int, ident: tuple[int, int]) -> None:
        self.path = path
        self._fd = fd
        self._ident = ident

    @classmethod
    def acquire(cls, path: str) -> PidFile:
        # O_NOFOLLOW: a symlink at the path is refused, never followed (root writing through
        # a link planted in /tmp would overwrite any file). O_NONBLOCK: a FIFO there must not
        # hang the start; it is refused below like any other non-regular file.
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise PidFileError(f"Could not create '{path}': {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PidFileError(f"Could not create '{path}': Not a regular file")
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise PidFileError(f"Cannot lock pid file: {exc.strerror}") from None
            # The file may have been unlinked or replaced between open and lock by the
            # daemon that owned it: then the lock guards nothing that others can see.
            try:
                now = os.stat(path, follow_symlinks=False)
            except OSError as exc:
                raise PidFileError(f"Cannot lock pid file: {exc.strerror}") from None
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise PidFileError("Cannot lock pid file: the file was replaced meanwhile")
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, (st.st_dev, st.st_ino))

    def release(self) -> None:
        """Remove the file if it is still the one this daemon locked, then unlock."""
        if self._fd < 0:
            return
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            pass
        else:
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1
