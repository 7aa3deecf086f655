"""``restore``: one disk of one point into a new image file, thin, checked against the digest.

``qemu-img convert`` reads the chain (the top layer names its backing files) and writes a
sparse raw file (or a standalone qcow2); zero ranges stay holes. The file is written under a
temporary name and renamed only after its content hashed to the point's digest, so a restore
that fails or is interrupted never leaves a half-written image under the requested name.
Hashing the result is cheap: only its data extents are read (``SEEK_DATA``), holes count as
zero chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from array import array
from pathlib import Path

from blockd.tools.backup import digest, lock
from blockd.tools.backup.errors import ToolError
from blockd.tools.backup.layers import chunk_hash, hash_chunks, read_map, zero_hash
from blockd.tools.backup.manifest import BackupDir, Chain, Point, fsync_dir, fsync_file
from blockd.tools.backup.progress import Reporter, human
from blockd.tools.backup.qemuimg import qemu_img


def pick_disk(point: Point, node: str | None) -> str:
    if node is None:
        if len(point.disks) != 1:
            raise ToolError(
                f"point {point.point} has {len(point.disks)} disks "
                f"({', '.join(point.disks)}); choose one with --node"
            )
        return next(iter(point.disks))
    if node not in point.disks:
        raise ToolError(f"point {point.point} has no disk '{node}' ({', '.join(point.disks)})")
    return node


def raw_sums(path: Path, size: int, chunk: int) -> digest.Sums:
    """The chunk hashes of a raw image, reading only its data extents."""
    chunks: dict[int, bytes] = {}
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            first, last = start // chunk, (end - 1) // chunk
            for idx in range(first, last + 1):
                if idx not in chunks:
                    n = min(chunk, size - idx * chunk)
                    chunks[idx] = chunk_hash(os.pread(fd, n, idx * chunk))
            pos = end
    zero = {idx for idx, h in chunks.items() if h == zero_hash(min(chunk, size - idx * chunk))}
    order = sorted(set(chunks) - zero)
    return digest.Sums(chunk, size, True, array("Q", order), b"".join(chunks[i] for i in order))


async def restore(
    directory: Path,
    number: int,
    to: Path,
    node: str | None,
    fmt: str,
    force: bool,
    rep: Reporter,
) -> None:
    bdir = BackupDir.open(directory)
    with lock.readers(bdir.path):
        chain, point = bdir.find_point(number)
        disk = pick_disk(point, node)
        _check_target(to, force)
        await restore_to(chain, point, disk, to, fmt)
        dp = point.disks[disk]
        used = os.stat(to).st_blocks * 512
        rep.result(
            f"restored {disk} at point {point.point} to {to} ({fmt}, {human(dp.size)}, "
            f"{human(used)} allocated); content matches the point's digest",
            point=point.point,
            disk=disk,
            path=str(to),
            size=dp.size,
            allocated=used,
        )


def _check_target(to: Path, force: bool) -> None:
    if to.is_dir():
        raise ToolError(f"{to} is a directory")
    if to.exists() and not force:
        raise ToolError(f"{to} exists; add --force to overwrite it")


def _image_sums(path: Path, fmt: str, size: int, chunk: int) -> digest.Sums:
    if fmt == "raw":
        return raw_sums(path, size, chunk)
    lm = read_map(path)
    return digest.Sums.from_chunks(lm, hash_chunks(lm))


async def restore_to(chain: Chain, point: Point, disk: str, to: Path, fmt: str) -> None:
    dp = point.disks[disk]
    top = chain.path / dp.layer
    tmp = to.with_name(f".{to.name}.partial")
    try:
        await qemu_img("convert", "-q", "-f", "qcow2", "-O", fmt, top, tmp)
        got = await asyncio.to_thread(_image_sums, tmp, fmt, dp.size, chain.cluster_size)
        if digest.point_digest([got]) != dp.digest:
            raise ToolError(
                f"the restored image of {disk} at point {point.point} does not match the "
                "point's digest; run 'blockd-backup verify' on the directory"
            )
        await asyncio.to_thread(fsync_file, tmp)
        os.replace(tmp, to)
        fsync_dir(to.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
