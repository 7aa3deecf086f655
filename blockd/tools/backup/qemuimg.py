"""Running qemu-img (image creation, check, convert, commit, rebase) without blocking the loop."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from blockd.tools.backup.errors import ToolError

QEMU_IMG = os.environ.get("BLOCKD_BACKUP_QEMU_IMG", "qemu-img")


async def qemu_img(*args: str | Path, check: bool = True) -> tuple[int, str, str]:
    """Run ``qemu-img ARGS``; (exit code, stdout, stderr). With *check*, a non-zero exit is a
    ToolError carrying qemu-img's own last line."""
    try:
        proc = await asyncio.create_subprocess_exec(
            QEMU_IMG,
            *map(str, args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise ToolError(f"cannot run {QEMU_IMG}: {exc.strerror}") from None
    try:
        out, err = await proc.communicate()
    except BaseException:
        # interrupted: do not leave qemu-img running on a file we are about to clean up
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    rc = proc.returncode
    assert rc is not None
    text_out, text_err = out.decode(errors="replace"), err.decode(errors="replace")
    if check and rc != 0:
        lines = (text_err or text_out).strip().splitlines()
        raise ToolError(f"qemu-img {args[0]} failed: {lines[-1] if lines else f'exit {rc}'}")
    return rc, text_out, text_err


async def create_layer(path: Path, size: int, cluster_size: int, backing: str | None) -> None:
    """A new layer; *backing* is the previous layer's file name, relative to *path*'s
    directory, so a chain can be moved or copied as a whole."""
    args: list[str | Path] = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}"]
    if backing is not None:
        args += ["-b", backing, "-F", "qcow2"]
    await qemu_img(*args, path, str(size))
