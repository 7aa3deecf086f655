"""Strings from QMP as the C library sees them.

QEMU's JSON parser keeps U+0000 as the two bytes C0 80 (modified UTF-8), so a NUL inside a
file name, socket path, host or port neither truncates the string nor fails: QEMU opens,
creates or binds a name with those two bytes in it, and reports errors with the name as the
client wrote it. blockd hands the kernel and the resolver the same bytes, which gives the same
results and keeps Python's "embedded null byte" errors away from clients.
"""

from __future__ import annotations

import os


def c_bytes(text: str) -> bytes:
    """*text* as the bytes QEMU would pass to a libc call."""
    try:
        raw = text.encode("utf-8", "surrogateescape")  # names decoded from the OS round-trip
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.replace(b"\0", b"\xc0\x80")


def real_path(path: str) -> str:
    """``os.path.realpath`` of a QMP path (blocking: run it in the I/O pool)."""
    return os.fsdecode(os.path.realpath(c_bytes(path)))
