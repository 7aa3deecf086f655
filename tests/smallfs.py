"""A small tmpfs of the test's own, for running out of space for real (ENOSPC where QEMU
and blockd meet it: data writes, metadata allocation, bitmap storing).

Mounted under the test's tmp_path and lazily unmounted afterwards; needs root, which
scripts/test and CI have.
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(fs: Path, name: str = "filler") -> Path:
    """Take every free byte of *fs* with one file; delete it to give the space back."""
    filler = fs / name
    chunk = bytes(64 * 1024)
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    # Whatever a partial block left: byte by byte is cheap for under 64 KiB.
    with open(filler, "ab", buffering=0) as f:
        while True:
            try:
                f.write(b"\0")
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return filler
