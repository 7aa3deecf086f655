"""Hostile qcow2 images over QMP: at least 500 seeded mutations of qemu-img-made images
(header fields, header extensions including the bitmaps extension, L1/L2 entries, refcount
table entries, refcount blocks, the bitmap directory, truncations) are handed to ONE running
blockd with ``blockdev-add``.

For every case:

* the reply comes within 2 s; a refusal is a ``GenericError`` with a readable ``desc``;
* qemu-storage-daemon is the oracle: whatever it refuses at open, blockd refuses too;
* an image that opens is exported over NBD and read as far as ``READ_CAP`` (then sampled), with
  a small client of our own; every request is answered within 2 s, either with data or with an
  error reply, and where both daemons return data from a read-only open it is the same data;
* the daemon is still up afterwards (``query-version``), and its log has no traceback.

Most cases open read-only (both daemons then see the same file); every fourth case opens
read/write on two private copies, since an open for writing may repair or rewrite the header.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import shutil
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient
from support import Daemon, EventLog, connect, qemu_img, qemu_io

KiB = 1024
MiB = 1024 * KiB
CASES = 520
#: Bytes read through the export in 256 KiB requests; past it, a few samples.
READ_CAP = 4 * MiB
CHUNK = 256 * KiB
SAMPLES = 4
REPLY_TIMEOUT = 2.0
QSD_TIMEOUT = 60.0
#: Compare with QSD on every n-th case (1 = all of them).
QSD_EVERY = 1
#: Fixed so that a failure names a case that can be made again; override to explore.
SEED = int(os.environ.get("BLOCKD_MUTATE_SEED", "20240503"))

L1_MASK = 0x00FFFFFFFFFFFE00
RT_MASK = 0xFFFFFFFFFFFFFE00
TOP64 = (1 << 64) - 1

# (name, offset, width, first version that has it)
FIELDS = [
    ("magic", 0, 4, 2),
    ("version", 4, 4, 2),
    ("backing_file_offset", 8, 8, 2),
    ("backing_file_size", 16, 4, 2),
    ("cluster_bits", 20, 4, 2),
    ("size", 24, 8, 2),
    ("crypt_method", 32, 4, 2),
    ("l1_size", 36, 4, 2),
    ("l1_table_offset", 40, 8, 2),
    ("refcount_table_offset", 48, 8, 2),
    ("refcount_table_clusters", 56, 4, 2),
    ("nb_snapshots", 60, 4, 2),
    ("snapshots_offset", 64, 8, 2),
    ("incompatible_features", 72, 8, 3),
    ("compatible_features", 80, 8, 3),
    ("autoclear_features", 88, 8, 3),
    ("refcount_order", 96, 4, 3),
    ("header_length", 100, 4, 3),
    ("compression_type", 104, 1, 3),
]
EXT_BITMAPS = 0x23852875
BITMAP_IN_PLACE = "Can't update bitmap directory"
EXT_TYPES = [0, 0xE2792ACA, 0x6803F857, 0x0537BE77, EXT_BITMAPS, 0x44415441, 0x12345678]


# -- base images -------------------------------------------------------------------------------
@dataclass
class Base:
    name: str
    data: bytes
    version: int
    cs: int
    #: Byte positions of table entries and structures, to aim mutations at.
    where: dict[str, list[int]] = field(default_factory=dict)
    #: (type_pos, len_pos, data_pos, data_len) of every header extension.
    exts: list[tuple[int, int, int, int]] = field(default_factory=list)


def _make_bases(d: Path) -> list[Base]:
    paths: list[tuple[str, Path]] = []
    raw = d / "backing.raw"
    raw.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, shorter than the overlay
    a = d / "v3-512-backing.qcow2"
    # A relative backing name, resolved next to each case's image: the bytes of every base
    # (so every case of a seed) do not depend on where the test runs.
    qemu_img(
        "create", "-f", "qcow2", "-o", "cluster_size=512", "-b", raw.name, "-F", "raw", a, "2M"
    )
    qemu_io(
        "-c",
        "write -P 1 0 200k",
        "-c",
        "write -z 300k 64k",
        "-c",
        "write -P 2 1000k 33k",
        "-c",
        "discard 100k 10k",
        a,
    )
    paths.append(("v3-512-backing", a))
    b = d / "v2-4k.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", b, "2M")
    qemu_io("-c", "write -P 3 5000 500k", "-c", "write -P 9 1900k 20k", b)
    paths.append(("v2-4k", b))
    src = d / "src.qcow2"
    qemu_img("create", "-f", "qcow2", src, "2M")
    qemu_io("-c", "write -P 4 0 700k", "-c", "write -P 5 1200k 100k", src)
    c = d / "v3-4k-compressed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", src, c)
    src.unlink()
    paths.append(("v3-4k-compressed", c))
    e = d / "v3-64k-bitmap.qcow2"
    qemu_img("create", "-f", "qcow2", e, "3M")
    qemu_img("bitmap", "--add", "-g", "64k", e, "b0")
    qemu_img("bitmap", "--add", "--disable", e, "b1")
    qemu_io("-c", "write -P 6 0 300k", "-c", "write -z 2M 64k", "-c", "write -P 7 2200k 4k", e)
    paths.append(("v3-64k-bitmap", e))
    f = d / "v3-16k-rc1-lazy.qcow2"
    qemu_img(
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16384,refcount_bits=1,lazy_refcounts=on",
        f,
        "3M",
    )
    qemu_io("-c", "write -P 8 16k 400k", "-c", "write -P 10 2M 48k", f)
    paths.append(("v3-16k-rc1-lazy", f))
    g = d / "v3-8k-rc64.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=8192,refcount_bits=64", g, "1M")
    qemu_io("-c", "write -P 11 0 100k", "-c", "write -P 12 900k 60k", g)
    paths.append(("v3-8k-rc64", g))

    bases = []
    for name, p in paths:
        data = p.read_bytes()
        version = struct.unpack_from(">I", data, 4)[0]
        cs = 1 << struct.unpack_from(">I", data, 20)[0]
        base = Base(name, data, version, cs)
        _survey(base)
        bases.append(base)
        p.unlink()
    return bases


def _u64(data: bytes, pos: int) -> int:
    return int(struct.unpack_from(">Q", data, pos)[0])


def _u32(data: bytes, pos: int) -> int:
    return int(struct.unpack_from(">I", data, pos)[0])


def _survey(b: Base) -> None:
    data, cs = b.data, b.cs
    l1_size, l1_off = struct.unpack_from(">IQ", data, 36)
    rt_off, rt_clusters = struct.unpack_from(">QI", data, 48)
    bf_off, bf_size = struct.unpack_from(">QI", data, 8)
    l1 = [l1_off + 8 * i for i in range(l1_size)]
    l2: list[int] = []
    for pos in l1:
        t = _u64(data, pos) & L1_MASK
        if t:
            l2 += [t + 8 * i for i in range(cs // 8) if _u64(data, t + 8 * i)]
    rt = [rt_off + 8 * i for i in range(rt_clusters * cs // 8)]
    used_rt = [p for p in rt if _u64(data, p)]
    rb: list[int] = []
    for pos in used_rt:
        blk = _u64(data, pos) & RT_MASK
        if blk and blk < len(data):
            rb += list(range(blk, min(blk + cs, len(data))))
    # Header extensions.
    pos = 72 if b.version == 2 else struct.unpack_from(">I", data, 100)[0]
    bitmap_dir: list[int] = []
    bitmap_tables: list[int] = []
    while pos + 8 <= cs:
        etype, elen = struct.unpack_from(">II", data, pos)
        b.exts.append((pos, pos + 4, pos + 8, elen))
        if etype == 0:
            break
        if etype == EXT_BITMAPS:
            nb, _r, dsize, doff = struct.unpack_from(">IIQQ", data, pos + 8)
            bitmap_dir = list(range(doff, doff + dsize))
            q = doff
            for _ in range(nb):
                tab_off, tab_size, _f, _t, _g, name_len, ext_size = struct.unpack_from(
                    ">QIIBBHI", data, q
                )
                bitmap_tables += [tab_off + 8 * i for i in range(tab_size)]
                q += (24 + ext_size + name_len + 7) & ~7
        pos += 8 + ((elen + 7) & ~7)
    # Entries that point somewhere are more interesting than empty ones, but keep some empties.
    b.where = {
        "l1": l1,
        "l2": l2 or l1,
        "rt": used_rt + rt[len(used_rt) : len(used_rt) + 4],
        "rb": rb or [rt_off],
        "bitmap_dir": bitmap_dir,
        "bitmap_table": bitmap_tables,
        "backing_name": list(range(bf_off, bf_off + bf_size)),
    }


# -- mutations -----------------------------------------------------------------------------------
def _field_value(rng: random.Random, name: str, old: int, width: int, b: Base) -> int:
    top = (1 << (8 * width)) - 1
    flen = len(b.data)
    cs = b.cs
    past_eof = (flen + cs - 1) // cs * cs + cs * rng.randint(0, 1 << rng.randrange(1, 20))
    generic = [
        0,
        1,
        top,
        top >> 1,
        old ^ (1 << rng.randrange(8 * width)),
        old + rng.choice([-1, 1, -8, 8]),
        rng.getrandbits(8 * width),
    ]
    special: dict[str, list[int]] = {
        "magic": [0x514649FA, 0x514649FB ^ 0x100, 0],
        "version": [0, 1, 4, 0xFFFFFFFF, 2 if old == 3 else 3],
        "cluster_bits": [0, 8, 22, 31, 63, 64, 255, old - 1, old + 1],
        "size": [1 << 40, 1 << 62, (1 << 63) + 512, old * 2, old + 1, old - 512, old * 64],
        "crypt_method": [1, 2, 3],
        "l1_size": [0, old - 1, old + 1, 1 << 22, (1 << 22) + 1, 0x7FFFFFFF, 0xFFFFFFFF],
        "backing_file_size": [1023, 1024, cs, old + 1, 0, 5000],
        "backing_file_offset": [cs, cs - 1, cs + 8, 72, 100, 104, old + 1, past_eof],
        "refcount_table_clusters": [0, 2, 1 << 12, (8 * MiB // cs) + 1, 0xFFFFFFFF, old + 1],
        "nb_snapshots": [1, 2, 65536, 65537, 0xFFFFFFFF],
        "snapshots_offset": [0, cs, cs + 1, past_eof, 1 << 62],
        "incompatible_features": [
            old | 1,
            old | 2,
            old | 4,
            old | 8,
            old | 16,
            old | 32,
            old | (1 << 63),
            old | (1 << rng.randrange(5, 64)),
        ],
        "compatible_features": [old | 1, old | 2, old | (1 << 63), 0],
        "autoclear_features": [old | 1, old | 2, old | 4, old & ~1, old | (1 << 63)],
        "refcount_order": [0, 1, 3, 5, 6, 7, 8, 64, 0xFFFFFFFF],
        "header_length": [0, 71, 72, 103, 105, 108, 112, 120, cs, cs + 8, 0xFFFFFFFF],
        "compression_type": [1, 2, 255],
    }
    if name.endswith("_offset"):
        special[name] = [
            *special.get(name, []),
            past_eof,
            old + 1,
            old + 512,
            old + cs // 2,
            1 << 55,
            1 << 56,
            1 << 62,
            TOP64 & ~(cs - 1),
            0,
        ]
    choices = special.get(name, []) * 2 + generic
    return rng.choice(choices) & top


def _entry_value(rng: random.Random, old: int, b: Base, mask: int, reserved: list[int]) -> int:
    cs = b.cs
    flen = len(b.data)
    off = old & mask
    flags = old & ~mask & TOP64
    past_eof = ((flen + cs - 1) // cs + rng.randint(0, 1 << rng.randrange(1, 24))) * cs
    meta = rng.choice([0, _u64(b.data, 40) & ~(cs - 1), _u64(b.data, 48) & ~(cs - 1), cs])
    choices = [
        past_eof | flags,
        (off + rng.choice([1, 8, 256, 512, cs // 2])) | flags,
        old | (1 << rng.choice(reserved)),
        (rng.getrandbits(56) | flags) & TOP64,
        (1 << 55) | flags,
        0,
        TOP64,
        old ^ (1 << rng.randrange(64)),
        meta | flags,
        old ^ (1 << 62),
        old ^ (1 << 63),
        old | 1,
    ]
    return rng.choice(choices) & TOP64


def _put(data: bytearray, pos: int, width: int, value: int) -> None:
    if pos + width <= len(data):
        data[pos : pos + width] = value.to_bytes(width, "big")


def _mutate(data: bytearray, rng: random.Random, b: Base) -> tuple[bytearray, str]:
    kinds = ["field"] * 9 + ["ext"] * 3 + ["bytes"] + ["l1"] * 3 + ["l2"] * 4 + ["rt"] * 2
    kinds += ["rb"] * 2 + ["trunc"]
    if b.where["bitmap_dir"]:
        kinds += ["bitmaps_ext"] * 3 + ["bitmap_dir"] * 3 + ["bitmap_table"] * 2
    if b.where["backing_name"]:
        kinds += ["backing_name"]
    kind = rng.choice(kinds)
    cs = b.cs
    if len(data) < len(b.data):
        return data, "none"  # truncated already: nothing left to aim at
    if kind == "field":
        usable = [f for f in FIELDS if f[3] <= b.version]
        name, off, width, _v = rng.choice(usable)
        old = int.from_bytes(data[off : off + width], "big")
        _put(data, off, width, _field_value(rng, name, old, width, b))
        return data, f"field:{name}"
    if kind == "bytes":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(0, min(cs, 512))] = rng.randrange(256)
        return data, "bytes"
    if kind == "backing_name":
        pos = rng.choice(b.where["backing_name"])
        data[pos] = rng.choice([0, ord("/"), ord("x"), 0xFF])
        return data, kind
    if kind in ("ext", "bitmaps_ext"):
        if kind == "bitmaps_ext":
            ext = next(e for e in b.exts if _u32(b.data, e[0]) == EXT_BITMAPS)
        elif rng.random() < 0.25 or len(b.exts) == 1:
            ext = b.exts[-1]  # the end marker
        else:
            ext = rng.choice(b.exts[:-1])
        type_pos, len_pos, data_pos, dlen = ext
        etype = _u32(b.data, type_pos)
        tag = {
            0xE2792ACA: "backing_fmt",
            0x6803F857: "features",
            EXT_BITMAPS: "bitmaps",
            0: "end",
        }.get(etype, "other")
        what = rng.choice(["type", "len", "len", "data"] + ["bitmaps"] * 6 * (tag == "bitmaps"))
        if what == "type":
            _put(data, type_pos, 4, rng.choice([t for t in EXT_TYPES if t != etype]))
        elif what == "len":
            _put(
                data,
                len_pos,
                4,
                rng.choice(
                    [
                        0,
                        1,
                        dlen - 1,
                        dlen + 1,
                        dlen + 8,
                        15,
                        16,
                        23,
                        25,
                        cs,
                        cs - 8,
                        0xFFFFFFFF,
                        rng.getrandbits(32),
                    ]
                )
                & 0xFFFFFFFF,
            )
        elif what == "data" and dlen:
            for _ in range(rng.randint(1, 3)):
                data[data_pos + rng.randrange(dlen)] = rng.randrange(256)
        else:  # the bitmaps extension's own fields
            sub = rng.choice(["nb", "reserved", "dsize", "doff"])
            nb, _r, dsize, doff = struct.unpack_from(">IIQQ", data, data_pos)
            if sub == "nb":
                _put(
                    data,
                    data_pos,
                    4,
                    rng.choice([0, nb - 1, nb + 1, 65535, 65536, 0xFFFFFFFF]) & 0xFFFFFFFF,
                )
            elif sub == "reserved":
                _put(data, data_pos + 4, 4, rng.choice([1, 0x80000000]))
            elif sub == "dsize":
                _put(
                    data,
                    data_pos + 8,
                    8,
                    rng.choice([0, dsize - 8, dsize + 8, 64 * MiB + 8, 1 << 40, TOP64]) & TOP64,
                )
            else:
                _put(
                    data,
                    data_pos + 16,
                    8,
                    rng.choice([0, doff + 1, doff + 8, doff + cs, 1 << 56, len(data) + cs]) & TOP64,
                )
        return data, f"ext:{tag}:{what}"
    if kind == "trunc":
        flen = len(data)
        l1 = _u64(b.data, 40)
        rt = _u64(b.data, 48)
        cut = rng.choice(
            [
                0,
                16,
                71,
                100,
                200,
                cs - 1,
                cs,
                l1 + 4,
                rt + 8,
                flen // 2,
                flen - cs,
                flen - 1,
                rng.randrange(flen),
            ]
        )
        return data[: max(0, min(cut, flen - 1))], "trunc"
    if kind == "rb":
        pos = rng.choice(b.where["rb"])
        data[pos] = rng.choice([0, 0xFF, data[pos] ^ (1 << rng.randrange(8)), 0x80, 1])
        return data, kind
    pool = b.where[kind]
    if not pool:
        return data, "none"
    pos = rng.choice(pool)
    old = _u64(data, pos) if pos + 8 <= len(data) else 0
    if kind == "bitmap_dir":
        # A byte or a field of a directory entry.
        if rng.random() < 0.5:
            data[pos] = rng.randrange(256)
        else:
            pos -= pos % 4
            _put(data, pos, 4, rng.choice([0, 1, 0xFFFFFFFF, 0x10000, rng.getrandbits(32)]))
        return data, kind
    if kind == "l1":
        new = _entry_value(rng, old, b, L1_MASK, [*range(1, 9), *range(56, 63)])
    elif kind == "l2":
        new = _entry_value(rng, old, b, L1_MASK, [*range(1, 9), *range(56, 62)])
    elif kind == "rt":
        new = _entry_value(rng, old, b, RT_MASK, list(range(0, 9)))
    else:  # bitmap_table
        new = _entry_value(rng, old, b, L1_MASK, [*range(1, 9), *range(56, 64)])
    _put(data, pos, 8, new)
    return data, kind


# -- a small NBD client of our own (fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies) ---------
class NbdReader:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int):
        self.reader = reader
        self.writer = writer
        self.size = size
        self.handle = 0

    @classmethod
    async def open(cls, sock: Path, name: str) -> NbdReader:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        hello = await reader.readexactly(18)
        assert hello[:16] == b"NBDMAGICIHAVEOPT", hello
        (sflags,) = struct.unpack(">H", hello[16:])
        no_zeroes = bool(sflags & 2)
        writer.write(struct.pack(">I", 1 | (2 if no_zeroes else 0)))
        writer.write(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name.encode())
        await writer.drain()
        size, _flags = struct.unpack(">QH", await reader.readexactly(10))
        if not no_zeroes:
            await reader.readexactly(124)
        return cls(reader, writer, size)

    async def read(self, offset: int, length: int) -> bytes | int:
        """The bytes, or the errno of an error reply."""
        self.handle += 1
        self.writer.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, self.handle, offset, length))
        await self.writer.drain()
        magic, err, handle = struct.unpack(">IIQ", await self.reader.readexactly(16))
        assert magic == 0x67446698 and handle == self.handle, (magic, handle)
        if err:
            return int(err)
        return await self.reader.readexactly(length)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
            await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


# -- one daemon, one case ------------------------------------------------------------------------
@dataclass
class Outcome:
    refused: bool
    error: dict[str, Any] | None = None
    size: int = -1
    #: offset -> bytes, or errno of an error reply.
    chunks: dict[int, bytes | int] = field(default_factory=dict)
    seconds: float = 0.0


async def _timed(coro: Any, what: str, case: int, limit: float = REPLY_TIMEOUT) -> Any:
    try:
        return await asyncio.wait_for(coro, limit)
    except TimeoutError:
        raise AssertionError(f"case {case}: {what} took more than {limit}s") from None


async def _run_case(
    c: QMPClient,
    events: EventLog,
    nbd: Path,
    path: Path,
    rw: bool,
    case: int,
    rng: random.Random,
    who: str = "blockd",
) -> Outcome:
    """Open, export, read, close one image; every step of blockd within REPLY_TIMEOUT. The
    oracle gets longer (QEMU reads every snapshot header of a hostile nb_snapshots one by
    one, which can take seconds) and must only not hang."""
    node = f"m{case}"
    limit = REPLY_TIMEOUT if who == "blockd" else QSD_TIMEOUT

    def timed(coro: Any, what: str) -> Any:
        return _timed(coro, f"{who} {what}", case, limit)

    spec = {
        "driver": "qcow2",
        "node-name": node,
        "read-only": not rw,
        "file": {"driver": "file", "filename": str(path)},
    }
    t0 = time.monotonic()
    try:
        await timed(c.execute("blockdev-add", spec), "blockdev-add")
    except ExecuteError as exc:
        err = dict(exc.received["error"])
        return Outcome(True, err, seconds=time.monotonic() - t0)
    out = Outcome(False, seconds=time.monotonic() - t0)
    try:
        await timed(
            c.execute("block-export-add", {"type": "nbd", "id": node, "node-name": node}),
            "block-export-add",
        )
        client = await timed(NbdReader.open(nbd, node), "NBD negotiation")
        try:
            out.size = client.size
            end = min(client.size, READ_CAP)
            offsets = list(range(0, end, CHUNK))
            if client.size > READ_CAP:
                offsets += sorted(
                    {rng.randrange(READ_CAP, client.size) & ~511 for _ in range(SAMPLES)}
                )
            for off in offsets:
                n = min(CHUNK, client.size - off)
                out.chunks[off] = await timed(client.read(off, n), f"NBD read at {off}")
        finally:
            await client.close()
        await timed(c.execute("block-export-del", {"id": node}), "block-export-del")
        await events.wait_for(
            lambda e: e["event"] == "BLOCK_EXPORT_DELETED" and e["data"]["id"] == node, limit
        )
    finally:
        try:
            await timed(c.execute("blockdev-del", {"node-name": node}), "blockdev-del")
        except ExecuteError as exc:
            # A damaged image may refuse the bitmap store: blockd keeps the node once and
            # says so; asking again closes it without the bitmaps.
            desc = exc.error.error.desc
            assert "run blockdev-del again" in desc, desc
            await timed(c.execute("blockdev-del", {"node-name": node}), "blockdev-del")
    return out


def _judge(
    label: str,
    rw: bool,
    mine: Outcome,
    theirs: Outcome,
    stats: dict[str, int],
    problems: list[str],
    notes: list[str],
) -> None:
    """Hold blockd's outcome against QSD's for the same image."""

    def bump(key: str) -> None:
        stats[key] = stats.get(key, 0) + 1

    if theirs.refused and not mine.refused:
        desc = str((theirs.error or {}).get("desc", ""))
        if rw and desc.startswith(BITMAP_IN_PLACE):
            # QEMU rewrites the bitmap directory in place at a read/write open and fails when
            # the rewritten directory would differ (a NUL inside a name, say); blockd writes
            # a new directory instead (qcow2/bitmaps.py), so that failure has no counterpart.
            bump("QSD in-place bitmap update fails, blockd opens")
            notes.append(f"{label}: QSD: {desc}; blockd opens it")
            return
        problems.append(f"{label}: QSD refuses ({theirs.error}) but blockd opens it")
        return
    if mine.refused:
        if not theirs.refused:
            bump("refused by blockd only")
            notes.append(f"{label}: only blockd refuses: {mine.error}")
        return
    if mine.size != theirs.size:
        problems.append(f"{label}: size {mine.size}, QSD says {theirs.size}")
        return
    if rw:
        # A read/write open may change metadata the mutated tables alias (blockd stores the
        # bitmap directory anew, QEMU in place): only a read-only open pins every byte.
        return
    for off, got in mine.chunks.items():
        want = theirs.chunks.get(off)
        if isinstance(got, bytes) and isinstance(want, bytes) and got != want:
            problems.append(f"{label}: data at {off} differs from QSD's")
            return
        if isinstance(got, bytes) and isinstance(want, int):
            bump("QSD read error, blockd data")
            notes.append(f"{label}: QSD read error {want} at {off}, blockd data")
            return


def _hwm_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


async def test_mutated_images_over_qmp(blockd: Daemon, qsd_factory: Any, tmp_path: Path) -> None:
    work = tmp_path / "m"
    work.mkdir()
    bases = _make_bases(work)
    qsd = qsd_factory()
    nbd_b = tmp_path / "nbd-blockd.sock"
    nbd_q = tmp_path / "nbd-qsd.sock"
    rng = random.Random(SEED)
    stats: dict[str, int] = {}
    kinds: dict[str, list[int]] = {}  # kind -> [cases, refused]
    problems: list[str] = []
    notes: list[str] = []
    descs: dict[str, int] = {}  # blockd's refusal texts (numbers folded), for the log
    slowest, slowest_label = 0.0, ""  # longest blockdev-add
    t_start = time.monotonic()
    async with connect(blockd.sock) as (c, ev), connect(qsd.sock) as (q, qev):
        for cl, sock in ((c, nbd_b), (q, nbd_q)):
            await cl.execute(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}
            )
        for case in range(CASES):
            base = bases[case % len(bases)] if case < len(bases) * 4 else rng.choice(bases)
            data = bytearray(base.data)
            tags = []
            for _ in range(rng.choice([1, 1, 1, 1, 1, 2, 2, 3])):
                data, tag = _mutate(data, rng, base)
                tags.append(tag)
            rw = case % 4 == 3
            label = f"case {case} ({base.name}, {'rw' if rw else 'ro'}, {'+'.join(tags)})"
            path = work / f"c{case}.qcow2"
            path.write_bytes(data)
            qpath = path
            if rw:
                qpath = work / f"c{case}-qsd.qcow2"
                qpath.write_bytes(data)
            read_rng = random.Random(case)
            try:
                mine = await _run_case(c, ev, nbd_b, path, rw, case, read_rng)
                assert blockd.proc.poll() is None, f"{label}: blockd died"
                await _timed(c.execute("query-version"), "query-version", case)
                theirs = None
                if case % QSD_EVERY == 0:
                    theirs = await _run_case(
                        q, qev, nbd_q, qpath, rw, case, random.Random(case), who="QSD"
                    )
            finally:
                path.unlink()
                if rw:
                    qpath.unlink()
            for t in tags:
                k = kinds.setdefault(
                    t.split(":")[0] + (":" + t.split(":")[1] if ":" in t else ""), [0, 0]
                )
                k[0] += 1
                k[1] += mine.refused
            if mine.refused:
                if mine.seconds > slowest:
                    slowest, slowest_label = mine.seconds, label
                stats["refused"] = stats.get("refused", 0) + 1
                err = mine.error or {}
                if err.get("class") != "GenericError":
                    problems.append(f"{label}: error class {err}")
                desc = str(err.get("desc", ""))
                if not desc or desc.startswith("Internal error") or "Traceback" in desc:
                    problems.append(f"{label}: unclear desc {desc!r}")
                short = re.sub(r"0x[0-9a-f]+|\d+", "N", desc)[:90]
                descs[short] = descs.get(short, 0) + 1
            else:
                if mine.seconds > slowest:
                    slowest, slowest_label = mine.seconds, label
                stats["opened"] = stats.get("opened", 0) + 1
                errs = sum(isinstance(v, int) for v in mine.chunks.values())
                stats["opened, read errors"] = stats.get("opened, read errors", 0) + bool(errs)
            if theirs is not None:
                stats["compared with QSD"] = stats.get("compared with QSD", 0) + 1
                _judge(label, rw, mine, theirs, stats, problems, notes)
        await c.execute("nbd-server-stop")
    elapsed = time.monotonic() - t_start
    print(f"\n{CASES} cases in {elapsed:.1f}s {stats}")
    print(f"  slowest blockdev-add {slowest:.3f}s: {slowest_label}")
    for k in sorted(kinds):
        print(f"  {k:28} {kinds[k][0]:4} cases, {kinds[k][1]:4} refused")
    for d, n in sorted(descs.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4}x {d}")
    for n in notes:
        print("  note:", n)
    hwm = _hwm_kib(blockd.proc.pid)
    print(f"  blockd peak RSS {hwm // 1024} MiB")
    shutil.rmtree(work, ignore_errors=True)
    assert blockd.proc.poll() is None
    log = blockd.log_text()
    if "Traceback" in log:
        at = log.index("Traceback")
        raise AssertionError(f"traceback in the daemon log:\n{log[at - 2000 : at + 3000]}")
    assert not problems, "\n".join(problems[:40]) + f"\n({len(problems)} problems)"
    assert stats.get("refused", 0) + stats.get("opened", 0) == CASES >= 500
    assert stats.get("refused", 0) >= CASES // 3, stats
    assert stats.get("opened", 0) >= CASES // 10, stats
    assert hwm < 512 * 1024, f"blockd peak RSS {hwm // 1024} MiB"


# -- the open checks the mutations above found missing, one by one -----------------------------
def _regressions(ext: dict[str, int]) -> list[tuple[str, Any, bool]]:
    """(what, mutation, whether blockd's text must be QSD's) on a v3 64 KiB image with a
    bitmap; *ext* has the positions of its bitmaps extension and end marker."""
    bm, end, bdir = ext["bitmaps"], ext["end"], ext["dir"]

    def put(*writes: tuple[str, int, int]) -> Any:
        def apply(data: bytearray) -> bytearray:
            for fmt, pos, value in writes:
                struct.pack_into(fmt, data, pos, value)
            return data

        return apply

    return [
        ("end marker longer than cluster 0", put((">I", end + 4, 0x10000)), True),
        ("backing name offset cuts the end marker", put((">Q", 8, end + 4), (">I", 16, 0)), True),
        ("CRYPTO extension without LUKS", put((">I", end, 0x0537BE77)), True),
        ("data-file-raw without a data file", put((">Q", 88, 1 | 2)), True),
        ("unaligned snapshot table offset, no snapshots", put((">Q", 64, 0x10001)), True),
        (
            "unaligned L1 table offset, empty image",
            put((">Q", 24, 0), (">I", 36, 0), (">Q", 40, 0x30001)),
            True,
        ),
        (
            "bitmaps extension of 32 bytes, autoclear bit clear",
            put((">Q", 88, 0), (">I", bm + 4, 32)),
            True,
        ),
        ("bitmap table offset past 2^63", put((">Q", bdir, (1 << 63) | 0x10000)), False),
        ("file ends inside the bitmaps extension", lambda d: d[: bm + 4], True),
    ]


async def test_open_checks_found_by_mutation(
    blockd: Daemon, qsd_factory: Any, tmp_path: Path
) -> None:
    img = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", img, "3M")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_io("-c", "write -P 6 0 300k", img)
    base = img.read_bytes()
    img.unlink()
    ext: dict[str, int] = {}
    pos = _u32(base, 100)
    while True:
        etype, elen = struct.unpack_from(">II", base, pos)
        if etype == EXT_BITMAPS:
            ext["bitmaps"] = pos
            ext["dir"] = _u64(base, pos + 24)
        if etype == 0:
            ext["end"] = pos
            break
        pos += 8 + ((elen + 7) & ~7)
    qsd = qsd_factory()
    wrong = []
    async with connect(blockd.sock) as (c, _), connect(qsd.sock) as (q, _q):
        for i, (what, mutate, same_text) in enumerate(_regressions(ext)):
            path = tmp_path / f"r{i}.qcow2"
            path.write_bytes(mutate(bytearray(base)))
            got = {}
            for name, client in (("blockd", c), ("qsd", q)):
                spec = {
                    "driver": "qcow2",
                    "node-name": f"r{i}",
                    "read-only": True,
                    "file": {"driver": "file", "filename": str(path)},
                }
                try:
                    await asyncio.wait_for(client.execute("blockdev-add", spec), REPLY_TIMEOUT)
                    await client.execute("blockdev-del", {"node-name": f"r{i}"})
                    got[name] = None
                except ExecuteError as exc:
                    got[name] = dict(exc.received["error"])
            path.unlink()
            mine, theirs = got["blockd"], got["qsd"]
            print(f"{what}: blockd {mine}, QSD {theirs}")
            if theirs is None:
                wrong.append(f"{what}: QSD opens it (the case no longer tests anything)")
            elif mine is None or mine["class"] != "GenericError":
                wrong.append(f"{what}: blockd answers {mine}, QSD {theirs}")
            elif same_text and mine["desc"] != theirs["desc"]:
                wrong.append(f"{what}: blockd says {mine['desc']!r}, QSD {theirs['desc']!r}")
        await c.execute("query-version")
    assert not wrong, "\n".join(wrong)
