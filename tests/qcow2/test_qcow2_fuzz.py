"""Hostile images: seeded mutations of headers, extensions, L1/L2 tables and refcount
structures of qemu-made images. Opening must either work or fail with QmpError, quickly and
without huge allocations; using an image that opened must only ever fail with OSError or
QmpError (never an IndexError, struct.error, AssertionError, a hang…)."""

from __future__ import annotations

import asyncio
import random
import resource
import shutil
import struct
import time
from pathlib import Path

import pytest
from qcow2_helpers import MiB, open_qcow2, qemu_img, qemu_io

from blockd.block.driver import WriteFlags
from blockd.block.graph import BlockGraph
from blockd.errors import QmpError

CASES = 520
READ_CAP = 4 * MiB

HEADER_FIELDS = [  # (offset, width) of every header field
    (4, 4),
    (8, 8),
    (16, 4),
    (20, 4),
    (24, 8),
    (32, 4),
    (36, 4),
    (40, 8),
    (48, 8),
    (56, 4),
    (60, 4),
    (64, 8),
    (72, 8),
    (80, 8),
    (88, 8),
    (96, 4),
    (100, 4),
    (104, 1),
]


def _make_bases(d: Path) -> list[str]:
    out = []
    a = str(d / "a.qcow2")  # v3, 512 B clusters, data + zero clusters + backing file
    raw = d / "base.raw"
    raw.write_bytes(bytes(range(256)) * 8192)
    qemu_img(
        "create", "-f", "qcow2", "-o", "cluster_size=512", "-b", str(raw), "-F", "raw", a, "2M"
    )
    qemu_io(a, "write -P 1 0 300k", "write -z 400k 64k", "write -P 2 1000k 33k", "discard 100k 10k")
    out.append(a)
    b = str(d / "b.qcow2")  # v2, 4 KiB clusters
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", b, "2M")
    qemu_io(b, "write -P 3 5000 700k")
    out.append(b)
    src = str(d / "src.qcow2")  # compressed, v3, 4 KiB clusters
    qemu_img("create", "-f", "qcow2", src, "2M")
    qemu_io(src, "write -P 4 0 1M", "write -P 5 1200k 100k")
    c = str(d / "c.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", src, c)
    out.append(c)
    e = str(d / "e.qcow2")  # v3, 64 KiB clusters, 1-bit refcounts
    qemu_img("create", "-f", "qcow2", "-o", "refcount_bits=1", e, "3M")
    qemu_io(e, "write -P 6 0 1M", "write -z 2M 64k")
    out.append(e)
    return out


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def _write(path: str, data: bytes | bytearray) -> None:
    Path(path).write_bytes(data)


def _structure(data: bytes) -> dict[str, list[int]]:
    """Byte positions of table entries in a pristine image, to aim mutations at."""
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    l1_size, l1_off = struct.unpack_from(">IQ", data, 36)
    rt_off, rt_clusters = struct.unpack_from(">QI", data, 48)
    l1 = [l1_off + 8 * i for i in range(l1_size)]
    l2: list[int] = []
    for pos in l1:
        t = struct.unpack_from(">Q", data, pos)[0] & 0x00FFFFFFFFFFFE00
        if t:
            l2 += [t + 8 * i for i in range(cs // 8)]
    rt = [rt_off + 8 * i for i in range(rt_clusters * cs // 8)]
    rb: list[int] = []
    for pos in rt:
        b = struct.unpack_from(">Q", data, pos)[0] & ~0x1FF
        if b and b < len(data):
            rb += list(range(b, min(b + cs, len(data))))
    return {"l1": l1, "l2": l2, "rt": rt[:8], "rb": rb or [rt_off]}


def _interesting(rng: random.Random, width: int, old: int) -> int:
    top = (1 << (8 * width)) - 1
    bit = 1 << rng.randrange(8 * width)
    choices = [
        0,
        1,
        top,
        top >> 1,
        bit,
        old ^ bit,
        old + rng.randint(-3, 3),
        rng.getrandbits(8 * width),
        512,
        513,
        0x10000,
        0x7FFFFFFF,
    ]
    return rng.choice(choices) & top


def _mutate(data: bytearray, rng: random.Random, where: dict[str, list[int]]) -> str:
    kind = rng.choice(["bytes", "field", "field", "ext", "l1", "l2", "l2", "rt", "rb"])
    if kind == "bytes":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(0, 512)] = rng.randrange(256)
        return kind
    if kind == "field":
        off, w = rng.choice(HEADER_FIELDS)
        old = int.from_bytes(data[off : off + w], "big")
        data[off : off + w] = _interesting(rng, w, old).to_bytes(w, "big")
        return f"field@{off}"
    if kind == "ext":
        pos = rng.randrange(104, 520, 4)
        data[pos : pos + 4] = _interesting(rng, 4, 0).to_bytes(4, "big")
        return kind
    pool = where[kind]
    if not pool:
        return "none"
    if kind == "rb":
        pos = rng.choice(pool) & ~1
        data[pos : pos + 2] = _interesting(rng, 2, 1).to_bytes(2, "big")
        return kind
    pos = rng.choice(pool)
    old = int.from_bytes(data[pos : pos + 8], "big")
    flags = rng.choice([0, 1 << 63, 1 << 62, 1, (1 << 63) | 1, (1 << 62) | (1 << 63)])
    new = rng.choice(
        [
            _interesting(rng, 8, old),
            (old & 0x00FFFFFFFFFFFE00) | flags,
            (rng.randrange(0, 1 << 20) << 9) | flags,
            old + rng.choice([-512, 512, 1, 4096]),
        ]
    ) & ((1 << 64) - 1)
    data[pos : pos + 8] = new.to_bytes(8, "big")
    return kind


async def _exercise(path: str, rw: bool, rng: random.Random) -> None:
    graph = BlockGraph()
    try:
        t0 = time.monotonic()
        try:
            # Generous bounds: they catch hangs, not slowness (the machine may be loaded).
            node = await asyncio.wait_for(open_qcow2(graph, path, rw=rw), 20)
        except QmpError:
            return
        finally:
            assert time.monotonic() - t0 < 20
        t0 = time.monotonic()
        try:
            length = node.length
            end = min(length, READ_CAP)
            pos = 0
            while pos < end:
                n = min(end - pos, 256 * 1024)
                await asyncio.wait_for(node.read(pos, n), 2)
                await asyncio.wait_for(node.block_status(pos, n), 2)
                pos += n
            if length > READ_CAP:
                for _ in range(4):
                    off = rng.randrange(0, length - 4096)
                    await asyncio.wait_for(node.read(off, 4096), 2)
            if rw and length > 8192:
                off = rng.randrange(0, min(length, READ_CAP) - 8192)
                await asyncio.wait_for(node.write(off, b"\xee" * 5000), 2)
                await asyncio.wait_for(node.write_zeroes(off, 8192, WriteFlags.MAY_UNMAP), 2)
                await asyncio.wait_for(node.write(0, b"\xdd" * 70000), 2)
                await asyncio.wait_for(node.discard(0, 65536), 2)
                await asyncio.wait_for(node.flush(), 2)
        except (OSError, QmpError):
            pass
        assert time.monotonic() - t0 < 60
    finally:
        try:
            await asyncio.wait_for(graph.close_all(), 5)
        except (OSError, QmpError):
            pass


@pytest.mark.parametrize("chunk", range(4))
async def test_mutated_images(tmp_path, chunk):
    bases = _make_bases(tmp_path)
    pristine = [_read(b) for b in bases]
    where = [_structure(p) for p in pristine]
    rng = random.Random(4242 + chunk)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kinds: dict[str, int] = {}
    for case in range(CASES // 4):
        i = rng.randrange(len(bases))
        data = bytearray(pristine[i])
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            k = _mutate(data, rng, where[i])
            kinds[k] = kinds.get(k, 0) + 1
        path = str(tmp_path / f"m{chunk}_{case}.qcow2")
        _write(path, data)
        await _exercise(path, rw=case % 3 == 0, rng=rng)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert (rss1 - rss0) * 1024 < 768 * MiB, f"peak RSS grew by {(rss1 - rss0) // 1024} MiB"
    assert len(kinds) >= 6, kinds
    shutil.rmtree(tmp_path, ignore_errors=True)
