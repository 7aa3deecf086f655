"""seSparse, strictly read-only: the generator (imagegen.py, written from sesparse.md) is
first proved with ``qemu-img convert -O raw``, then the same images are read through blockd
and qemu-storage-daemon side by side; every header check and every corrupt table entry is
held against QSD in the same run."""

from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import Any

import pytest
from imagegen import GRAIN, GT_ENTRIES, SeSparse, build_sesparse, grain_entry, random_grains
from nbdtest import RawNbd
from support import qemu_img, qemu_io
from vmdktest import (
    MiB,
    Pair,
    cid_of,
    descriptor_of,
    per_side,
    qemu_map_fails,
    same_data,
    views,
    vmdk_node,
)

from blockd.nbd import protocol as P

CAPACITY = 40 * MiB + 3 * 512  # three grain tables, the last grain cut short


def _raw_of(path: Path, tmp: Path) -> bytes:
    out = tmp / "convert.raw"
    qemu_img("convert", "-U", "-f", "vmdk", "-O", "raw", str(path), str(out))
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def _parent(tmp: Path, rng: random.Random) -> tuple[Path, bytes, int]:
    """A monolithicSparse parent with data everywhere the delta may leave unallocated."""
    p = tmp / "parent.vmdk"
    qemu_img("create", "-f", "vmdk", str(p), str(CAPACITY))
    src = tmp / "parent-src.bin"
    src.write_bytes(rng.randbytes(8 * MiB))
    qemu_io("-f", "vmdk", "-c", f"write -s {src} 0 8M", "-c", f"write -s {src} 20M 8M", str(p))
    data = bytearray(CAPACITY)
    blob = src.read_bytes()
    data[: 8 * MiB] = blob
    data[20 * MiB : 28 * MiB] = blob
    return p, bytes(data), cid_of(descriptor_of(p))


def test_generator_proved_by_qemu_img_then_read_by_blockd(pair: Pair, tmp_path: Path) -> None:
    rng = random.Random(7)
    parent, parent_data, pcid = _parent(tmp_path, rng)
    cases: list[tuple[str, SeSparse, bytes | None]] = [
        ("alone", SeSparse(CAPACITY, random_grains(rng, CAPACITY, 120), seed=1), None),
        (
            "delta",
            SeSparse(
                CAPACITY,
                {**random_grains(rng, CAPACITY, 80), 0: b"\x11" * GRAIN, 5: "zero", 6: "unmapped"},
                parent=parent,
                parent_cid=pcid,
                seed=2,
            ),
            parent_data,
        ),
        # QEMU takes the size from the header and ignores the descriptor line's.
        (
            "line-size",
            SeSparse(CAPACITY, random_grains(rng, CAPACITY, 20), line_sectors=8, seed=3),
            None,
        ),
    ]
    for name, spec, pdata in cases:
        desc, want = build_sesparse(tmp_path, name, spec, pdata)
        # 1. The generator, proved by qemu-img: what it meant is what QEMU reads.
        assert _raw_of(desc, tmp_path) == want, name
        # 2. The same image through both daemons, read over NBD, maps compared.
        pair.add_ok(vmdk_node(name, desc, **{"read-only": True}))
        uris = pair.export(name)
        raw = tmp_path / f"{name}.want"
        raw.write_bytes(want)
        same_data(uris["blockd"], raw)
        v = views(uris)
        assert v["blockd"] == v["qsd"], name
        if spec.parent is not None:
            assert "backing" in v["blockd"]["depth"], v["blockd"]["depth"]
            info = [pair.named_node(side, name, flat=False) for side in ("blockd", "qsd")]
            for i in info:  # the extent files' host allocation is not what is compared
                i["image"].pop("actual-size")
                i["image"]["backing-image"].pop("actual-size")
            assert info[0] == info[1]
            assert info[0]["image"]["format-specific"]["data"]["extents"][0]["format"] == (
                "SESPARSE"
            )
        pair.drop(name)
        raw.unlink()
    # A vmdk delta whose parent is the seSparse snapshot (qemu-img reads it to make the delta).
    top = tmp_path / "over.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", "delta.vmdk", "-F", "vmdk", str(top))
    qemu_io("-f", "vmdk", "-c", "write -P 0x42 1M 100k", str(top))
    pair.add_ok(vmdk_node("over", top, **{"read-only": True}))
    uris = pair.export("over")
    same_data(uris["blockd"], top, "vmdk")
    v = views(uris)
    assert v["blockd"] == v["qsd"]
    assert "backing depth 3" in v["blockd"]["depth"], v["blockd"]["depth"]
    pair.drop("over")


def test_read_write_open_refused_or_read_only(pair: Pair, tmp_path: Path) -> None:
    desc, _want = build_sesparse(tmp_path, "rw", SeSparse(CAPACITY, {3: b"\x33" * GRAIN}))
    before = (tmp_path / "rw-sesparse.vmdk").read_bytes()
    got = pair.add(vmdk_node("rw", desc))
    want = "No write support for seSparse images available"
    assert got["blockd"] == got["qsd"] == {"error": {"class": "GenericError", "desc": want}}
    # The check comes before any header check: a corrupt image gets the same text.
    bad, _ = build_sesparse(tmp_path, "rwbad", SeSparse(CAPACITY, header={"magic": 1}))
    got = pair.add(vmdk_node("rwbad", bad))
    assert got["blockd"] == got["qsd"] == {"error": {"class": "GenericError", "desc": want}}
    # auto-read-only: the node opens read-only, its file children stay as they were (each
    # daemon gets its own copy: a read/write open takes the file's write lock).
    dirs = per_side(tmp_path, desc, tmp_path / "rw-sesparse.vmdk")
    for side, d in dirs.items():
        spec = vmdk_node("auto", d / desc.name, **{"auto-read-only": True})
        assert "return" in pair.cmd(side, "blockdev-add", spec)
        assert pair.named_node(side, "auto")["ro"] is True
        args = {"type": "nbd", "id": "w", "node-name": "auto", "writable": True}
        res = pair.cmd(side, "block-export-add", args)
        assert res["error"]["desc"] == "Cannot export read-only node as writable", res
    pair.export("auto")
    for side in dirs:
        # A write sent anyway: QSD answers EINVAL, blockd EPERM as the NBD spec asks
        # (docs/compatibility.md); the data stays as it was on both.
        c = RawNbd(str(pair.nbd[side]))
        c.go("auto")
        r = c.request(P.CMD_WRITE, 3 * GRAIN, GRAIN, payload=b"\x99" * GRAIN)
        assert r["error"] == (errno.EPERM if side == "blockd" else errno.EINVAL), (side, r)
        assert c.read(3 * GRAIN, GRAIN) == b"\x33" * GRAIN
        c.disconnect()
    pair.drop("auto")
    for d in dirs.values():
        assert (d / "rw-sesparse.vmdk").read_bytes() == before
    assert (tmp_path / "rw-sesparse.vmdk").read_bytes() == before


HEADER_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("magic", {"header": {"magic": 0xCAFEBABF}}, "Bad const header magic: 0x00000000cafebabf"),
    (
        "version",
        {"header": {"version": 0x0000000200000000}},
        "Unsupported version: 0x0000000200000000",
    ),
    ("grain size", {"header": {"grain_size": 16}}, "Unsupported grain size: 16"),
    ("table size", {"header": {"grain_table_size": 128}}, "Unsupported grain table size: 128"),
    ("flags", {"header": {"flags": 0x10}}, "Unsupported flags: 0x0000000000000010"),
    (
        "reserved",
        {"header": {"reserved3": 7}},
        "Unsupported reserved bits: 0x0000000000000000 0x0000000000000000 "
        "0x0000000000000007 0x0000000000000000",
    ),
    ("const pad", {"const_pad": b"\0" * 300 + b"\1"}, "Unsupported non-zero const header padding"),
    (
        "volatile magic",
        {"volatile": {"magic": 0xCAFECAFD}},
        "Bad volatile header magic: 0x00000000cafecafd",
    ),
    (
        "journal",
        {"volatile": {"replay_journal": 1}},
        "Image is dirty, Replaying journal not supported",
    ),
    ("volatile pad", {"volatile_pad": b"\x80"}, "Unsupported non-zero volatile header padding"),
    (
        "volatile past EOF",
        {"header": {"volatile_header_offset": 1 << 30}},
        "Bad volatile header magic: 0x0000000000000000",
    ),
    ("L1 bound", {"header": {"grain_dir_size": 524289}}, "L1 size too big"),
    # The checks run in QEMU's order: the first failing one is reported.
    (
        "order",
        {"header": {"grain_size": 16, "flags": 1}, "volatile": {"magic": 0}},
        "Unsupported grain size: 16",
    ),
]


@pytest.mark.parametrize("what,knobs,text", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_header_checks_as_qsd(
    pair: Pair, tmp_path: Path, what: str, knobs: dict[str, Any], text: str
) -> None:
    desc, _ = build_sesparse(tmp_path, "h", SeSparse(CAPACITY, {1: b"\1" * GRAIN}, **knobs))
    got = pair.add(vmdk_node("h", desc, **{"read-only": True}))
    assert got["qsd"] == {"error": {"class": "GenericError", "desc": text}}, got
    assert got["blockd"] == got["qsd"]


def test_l1_bound_exactly_32mi_entries_opens(pair: Pair, tmp_path: Path) -> None:
    """A grain directory of 524288 sectors (32 Mi entries) opens; the directory lies past
    the end of the small file and reads as empty, without blockd reading it whole."""
    spec = SeSparse(CAPACITY, {1: b"\1" * GRAIN}, header={"grain_dir_size": 524288})
    desc, _ = build_sesparse(tmp_path, "b", spec)
    assert (tmp_path / "b-sesparse.vmdk").stat().st_blocks * 512 < 2 * MiB
    pair.add_ok(vmdk_node("b", desc, **{"read-only": True}))
    uris = pair.export("b")
    v = views(uris)
    assert v["blockd"] == v["qsd"]
    pair.drop("b")


def test_corrupt_entries_read_as_qsd(pair: Pair, tmp_path: Path) -> None:
    """Corrupt directory and table entries: plain reads show the parent (or zeroes) as in
    QEMU; block status of those ranges fails with EIO on both."""
    rng = random.Random(11)
    parent, parent_data, pcid = _parent(tmp_path, rng)
    t2 = 2 * GT_ENTRIES  # first grain of the third table
    spec = SeSparse(
        CAPACITY,
        {0: b"\xaa" * GRAIN, 10: b"\xbb" * GRAIN, t2 + 1: b"\xcc" * GRAIN},
        parent=parent,
        parent_cid=pcid,
        gt={
            1: 0x0000000000000005,  # unallocated type with bits set
            2: 0x4000000000000000,  # unknown type
            3: 0xF000000000000001,
            4: grain_entry(1 << 30),  # a grain far past the end of the file: zeroes
        },
        # A directory entry of the wrong type, and one whose table lies past 32-bit sectors.
        gd={1: 0x2000000000000001, 2: 0x10000000FFFFFFFF},
    )
    desc, want = build_sesparse(tmp_path, "c", spec, parent_data)
    # Grains 1-3 read as the parent's bytes, grain 4 (past the end of the file) as zeroes,
    # the third table (its directory entry is corrupt) as the parent, its data unseen.
    want = want[: 4 * GRAIN] + bytes(GRAIN) + want[5 * GRAIN : t2 * GRAIN]
    want += parent_data[t2 * GRAIN :]
    assert want[GRAIN : 4 * GRAIN] == parent_data[GRAIN : 4 * GRAIN] != bytes(3 * GRAIN)
    pair.add_ok(vmdk_node("c", desc, **{"read-only": True}))
    uris = pair.export("c")
    ranges = [(0, 5 * GRAIN), (GT_ENTRIES * GRAIN, 2 * GRAIN), (t2 * GRAIN, 2 * GRAIN)]
    for side, u in uris.items():
        # Plain reads (simple replies: no block status behind them) show the parent.
        c = RawNbd(str(pair.nbd[side]))
        c.go("c", structured=False)
        for off, n in ranges:
            got = c.read(off, n)
            assert got == want[off : off + n], (side, off)
        c.disconnect()
        assert "Input/output error" in qemu_map_fails(u)
    pair.drop("c")
