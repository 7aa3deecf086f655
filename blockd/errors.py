"""The error tree of blockd.

Every user-visible failure is a :class:`QmpError`: it carries QEMU's error class and the text
QEMU would print, so the dispatcher turns it into a reply in one place. I/O failures inside the
block layer are plain :class:`OSError` with an errno, as in QEMU (negative errno returns); job
code maps them to ``BLOCK_JOB_ERROR`` actions and to the strerror text QEMU reports.
"""

from __future__ import annotations

import errno as _errno
import os


class BlockdError(Exception):
    """Root of blockd's own exceptions."""


class QmpError(BlockdError):
    """A command failed; ``qmp_class`` and ``desc`` go on the wire as they are."""

    qmp_class = "GenericError"

    def __init__(self, desc: str, qmp_class: str | None = None, *, hint: str = "") -> None:
        super().__init__(desc)
        self.desc = desc
        #: Advice for a person (QEMU's error_append_hint): printed on the command line,
        #: never sent over QMP, as in QEMU.
        self.hint = hint
        if qmp_class is not None:
            self.qmp_class = qmp_class


class CommandNotFoundError(QmpError):
    qmp_class = "CommandNotFound"


class DeviceNotFoundError(QmpError):
    qmp_class = "DeviceNotFound"


class DeviceNotActiveError(QmpError):
    qmp_class = "DeviceNotActive"


def strerror(err: int) -> str:
    """The message glibc gives for *err*, which is what QEMU prints in job errors."""
    return os.strerror(err)


def io_error(err: int = _errno.EIO, what: str = "") -> OSError:
    """An OSError for the block layer; *what* adds context for logs, never for the wire."""
    return OSError(err, what or os.strerror(err))


def errno_of(exc: BaseException) -> int:
    """The errno a failed request reports (EIO when the exception has none)."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return _errno.EIO
