"""What the stress test compares at the end: bitmaps against the shadow record (read over NBD
from blockd while it runs, from qemu-storage-daemon after it stopped or died), image data
against the writes, image checks, the daemon's fds and its log."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

from bitarray import bitarray
from bitarray.util import zeros

from blockd.nbd import protocol as P
from blockd.nbd.client import NbdClient
from churn.model import UNIT, BitmapModel, ImageModel, decode_unit, round_out

DIRTY_CONTEXT = "qemu:dirty-bitmap:"

#: Daemon log lines that mean a bug whatever the test did.
BAD_LOG = re.compile(
    r"Traceback|internal error|Task exception was never retrieved| (ERROR|CRITICAL) "
)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def bad_log_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if BAD_LOG.search(line)]


async def dirty_units(conn: NbdClient, bitmap: str, size: int) -> bitarray:
    """The 4 KiB units *bitmap* reports dirty, over NBD (``qemu:dirty-bitmap:NAME``)."""
    cid = conn.info.contexts[DIRTY_CONTEXT + bitmap]
    out = zeros(size // UNIT)
    off = 0
    while off < size:
        extents = (await conn.block_status(off, size - off)).get(cid)
        if not extents:
            raise AssertionError(f"no extents for {bitmap} at {off}")
        for length, flags in extents:
            n = min(length, size - off)
            if flags & P.STATE_DIRTY:
                out[off // UNIT : (off + n) // UNIT] = 1
            off += n
    return out


def compare_bitmap(where: str, bm: BitmapModel, actual: bitarray, exact: bool) -> list[str]:
    """Never fewer units than the record says were written; with *exact*, no more than the
    record allows either (rounded out to the bitmap's granularity)."""
    problems = []
    missing = bm.must & ~actual
    if missing.any():
        problems.append(
            f"{where}: bitmap {bm.name} misses {missing.count()} written units "
            f"(first at {missing.index(1) * UNIT})"
        )
    if exact:
        extra = actual & ~round_out(bm.may, bm.granularity)
        if extra.any():
            problems.append(
                f"{where}: bitmap {bm.name} has {extra.count()} units never written "
                f"(first at {extra.index(1) * UNIT})"
            )
    if problems:
        problems.append(f"{where}: history of {bm.name}: {'; '.join(bm.history[-12:])}")
    return problems


async def read_all(conn: NbdClient, size: int) -> bytes:
    chunks = [conn.read(off, min(1 << 20, size - off)) for off in range(0, size, 1 << 20)]
    return b"".join(await asyncio.gather(*chunks))


def compare_data(where: str, img: ImageModel, data: bytes, crashed: bool) -> list[str]:
    """Every unit holds a value the record allows: the last write (or, after a crash, one
    written after the last write known to be stable)."""
    now = 1 << 62
    problems = []
    for u in range(img.units):
        allowed = img.crash_candidates(u) if crashed else img.candidates(u, now, now)
        if None in allowed:
            continue
        got = decode_unit(memoryview(data)[u * UNIT : (u + 1) * UNIT])
        if got not in allowed:
            problems.append(f"{where}: unit at {u * UNIT} holds {got}, expected one of {allowed}")
            if len(problems) > 5:
                break
    return problems


async def run_tool(*cmd: str | Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *[str(c) for c in cmd], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def image_check(path: Path, share: bool = False) -> tuple[int, str]:
    """``qemu-img check``: 0 clean, 3 leaked clusters only, 2 corruption, 1 not checked.
    *share*: the image's backing file may be open read-write (a sync=none backup target
    has its source as backing file)."""
    return await run_tool("qemu-img", "check", *(["-U"] if share else []), "--output=json", path)


async def image_bitmaps(path: Path) -> dict[str, dict[str, Any]]:
    """The bitmaps stored in a qcow2 image, by name (``qemu-img info``, share-locked);
    none if the image cannot be opened (``qemu-img check`` says why)."""
    rc, out = await run_tool("qemu-img", "info", "-U", "--output=json", path)
    if rc != 0:
        return {}
    info = json.loads(out)
    bms = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {bm["name"]: bm for bm in bms}
