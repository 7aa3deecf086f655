"""Compressed writes to qcow2 (``WriteFlags.COMPRESSED``, QEMU's BDRV_REQ_WRITE_COMPRESSED)
through blockd's driver API, checked with qemu-img: the image stays clean, reads back right, its
compressed L2 descriptors are exact, and the compressed bytes are the ones QEMU writes.

qemu-img 7.2's ``map --output=json`` has no ``compressed`` member yet (it came in 8.0): a
compressed range shows as data without an ``offset``, and ``check --output=json`` counts
``compressed-clusters``. The tests use both, and read the L2 tables themselves.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import struct
import sys
import zlib
from pathlib import Path

import pytest
from qcow2_helpers import (
    MiB,
    Shadow,
    apply_op,
    batches,
    check_image,
    open_qcow2,
    options,
    qemu_img,
    random_ops,
)

from blockd.block.driver import WriteFlags
from blockd.block.graph import BlockGraph

CLUSTERS = [512, 4096, 65536, 2 * MiB]
_OFFSET_MASK = 0x00FFFFFFFFFFFE00
_COPIED = 1 << 63
_COMPRESSED = 1 << 62


# -- image inspection ------------------------------------------------------------------------
def l2_entries(path: str) -> tuple[int, list[int]]:
    """(cluster_bits, the L2 entry of every guest cluster), read straight from the file."""
    with open(path, "rb") as f:
        h = f.read(48)
        cb = struct.unpack(">I", h[20:24])[0]
        size = struct.unpack(">Q", h[24:32])[0]
        l1_size, l1_off = struct.unpack(">IQ", h[36:48])
        f.seek(l1_off)
        l1 = struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))
        cs = 1 << cb
        out: list[int] = []
        for e in l1:
            off = e & _OFFSET_MASK
            if not off:
                out += [0] * (cs // 8)
                continue
            f.seek(off)
            out += struct.unpack(f">{cs // 8}Q", f.read(cs))
    return cb, out[: -(-size // cs)]


def compressed_clusters(path: str) -> dict[int, bytes]:
    """Guest cluster index -> the compressed bytes its descriptor points at. Asserts the
    spec's rules on the way: no COPIED flag, and a sector count that covers exactly the
    sectors the deflate stream touches."""
    cb, ents = l2_entries(path)
    cs = 1 << cb
    shift = 62 - (cb - 8)
    mask = (1 << (cb - 8)) - 1
    out: dict[int, bytes] = {}
    with open(path, "rb") as f:
        for i, e in enumerate(ents):
            if not e & _COMPRESSED:
                continue
            assert not e & _COPIED, f"cluster {i}: COPIED set on a compressed entry"
            coff = e & ((1 << shift) - 1)
            nsec = ((e >> shift) & mask) + 1
            f.seek(coff)
            raw = f.read(nsec * 512 - (coff & 511))
            d = zlib.decompressobj(-15)
            data = d.decompress(raw)
            assert d.eof and len(data) == cs, f"cluster {i}: bad compressed stream"
            clen = len(raw) - len(d.unused_data)
            assert (coff + clen - 1) // 512 - coff // 512 == nsec - 1, (
                f"cluster {i}: descriptor says {nsec} sectors for {clen} bytes at {coff:#x}"
            )
            out[i] = raw[:clen]
    return out


def map_json(path: str) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", path).stdout)


def assert_clean(path: str) -> dict:
    res = check_image(path)
    assert res["rc"] == 0, res
    assert not res.get("leaks") and not res.get("corruptions"), res
    return res


def compare_raw(img: str, data: bytes, tmp: Path) -> None:
    ref = tmp / "ref.raw"
    ref.write_bytes(data)
    try:
        cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, str(ref), check=False)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    finally:
        ref.unlink()


# -- content -----------------------------------------------------------------------------------
def _cluster(kind: str, i: int, cs: int, rng: random.Random) -> bytes:
    if kind == "random":
        return rng.randbytes(cs)
    if kind == "zero":
        return bytes(cs)
    if kind == "pattern":
        return ((b"blockd-%d|" % i) * cs)[:cs]
    # half random, half zeroes: shrinks to about half, except in the smallest clusters
    return rng.randbytes(cs // 2) + bytes(cs - cs // 2)


KINDS = ["random", "zero", "pattern", "half"]


def make_content(cs: int, seed: int) -> tuple[bytes, int]:
    """Image data of a few clusters of each kind and a last cluster cut short (when the
    cluster is bigger than a sector); returns (data, image size)."""
    n = {512: 64, 4096: 48, 65536: 16, 2 * MiB: 5}[cs]
    rng = random.Random(seed)
    data = b"".join(_cluster(KINDS[(i * 7 + seed) % 4], i, cs, rng) for i in range(n))
    size = len(data)
    if cs > 512:
        size += cs // 2
        data += _cluster("pattern", n, cs, rng)[: cs // 2]
    return data, size


def would_compress(cluster: bytes, cs: int) -> bool:
    """QEMU's rule, computed independently: raw deflate (window 4 KiB) in fewer than
    cluster_size bytes."""
    padded = cluster + bytes(cs - len(cluster))
    c = zlib.compressobj(-1, zlib.DEFLATED, -12, 9)
    return len(c.compress(padded) + c.flush()) < cs


def expected_compressed(data: bytes, cs: int) -> set[int]:
    n = -(-len(data) // cs)
    return {i for i in range(n) if would_compress(data[i * cs : (i + 1) * cs], cs)}


async def write_compressed(node, data: bytes, cs: int, rng: random.Random) -> None:
    """Write all of *data* compressed, in requests of 1..8 clusters, several at once."""
    reqs = []
    pos = 0
    while pos < len(data):
        n = min(len(data) - pos, rng.randint(1, 8) * cs)
        reqs.append((pos, n))
        pos += n
    rng.shuffle(reqs)
    for i in range(0, len(reqs), 4):
        await asyncio.gather(
            *(
                node.write(o, memoryview(data)[o : o + n], WriteFlags.COMPRESSED)
                for o, n in reqs[i : i + 4]
            )
        )


def _create(img: str, version: str, cs: int, size: int, *extra: str) -> None:
    compat = "0.10" if version == "v2" else "1.1"
    opts = f"compat={compat},cluster_size={cs}" + "".join("," + e for e in extra)
    qemu_img("create", "-f", "qcow2", "-o", opts, img, str(size))


# -- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cs", CLUSTERS)
@pytest.mark.parametrize("version", ["v2", "v3"])
async def test_compressed_write_roundtrip(tmp_path, version, cs):
    seed = cs.bit_length() + (7 if version == "v3" else 0)
    rng = random.Random(seed)
    data, size = make_content(cs, seed)
    img = str(tmp_path / "c.qcow2")
    _create(img, version, cs, size)
    graph = BlockGraph()
    # Small caches for small clusters: L2 tables and refcount blocks get evicted.
    extra = {"l2-cache-size": 4 * cs, "refcount-cache-size": 4 * cs} if cs <= 4096 else {}
    node = await open_qcow2(graph, img, **extra)
    try:
        await write_compressed(node, data, cs, rng)
        assert bytes(await node.read(0, size)) == data

        # Refused requests, with QEMU's errors.
        compressible = _cluster("pattern", 0, cs, rng)
        with pytest.raises(OSError) as ei:  # a cluster that has host space already
            await node.write(0, compressible, WriteFlags.COMPRESSED)
        assert ei.value.errno == errno.EIO
        with pytest.raises(OSError) as ei:  # not cluster aligned
            await node.write(256, compressible, WriteFlags.COMPRESSED)
        assert ei.value.errno == errno.EINVAL
        if cs > 512:
            with pytest.raises(OSError) as ei:  # ends inside a cluster, not at the image end
                await node.write(cs, compressible[: cs - 512], WriteFlags.COMPRESSED)
            assert ei.value.errno == errno.EINVAL
        assert bytes(await node.read(0, size)) == data
    finally:
        await graph.close_all()

    res = assert_clean(img)
    want = expected_compressed(data, cs)
    got = compressed_clusters(img)
    assert set(got) == want
    assert res["compressed-clusters"] == len(want)
    assert 0 < len(want) < -(-size // cs)  # random clusters stay uncompressed
    _, ents = l2_entries(img)
    for i, e in enumerate(ents):
        if i not in want:
            assert e & _COPIED and e & _OFFSET_MASK and not e & _COMPRESSED, (i, hex(e))
    compare_raw(img, data, tmp_path)

    # qemu-img map: compressed clusters are data with no host offset.
    for ext in map_json(img):
        first = ext["start"] // cs
        last = (ext["start"] + ext["length"] - 1) // cs
        covered = set(range(first, last + 1))
        assert ext["data"] and ext["present"]
        if "offset" in ext:
            assert not covered & want, ext
        else:
            assert covered <= want, ext

    # The same clusters compressed by QEMU itself (qemu-img convert -c, one coroutine):
    # byte for byte the same deflate streams. Zero clusters convert skips.
    src = tmp_path / "src.raw"
    out = tmp_path / "qemu.qcow2"
    src.write_bytes(data + bytes(size - len(data)))
    try:
        compat = "0.10" if version == "v2" else "1.1"
        qemu_img(
            "convert",
            "-c",
            "-m",
            "1",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            f"compat={compat},cluster_size={cs}",
            str(src),
            str(out),
        )
        theirs = compressed_clusters(str(out))
    finally:
        src.unlink()
        out.unlink(missing_ok=True)
    assert theirs
    for i, blob in theirs.items():
        assert got.get(i) == blob, f"cluster {i} compressed differently"
    os.unlink(img)


@pytest.mark.parametrize("cs", CLUSTERS)
@pytest.mark.parametrize("version", ["v2", "v3"])
async def test_overwrite_compressed_clusters(tmp_path, version, cs):
    """Normal writes, write-zeroes and discards over compressed clusters (copy-on-write
    out of compressed data, freeing shared host clusters), then compressed writes again into
    what was discarded or zeroed: qemu-img check stays clean and the data is right."""
    seed = 100 + cs.bit_length() + (7 if version == "v3" else 0)
    rng = random.Random(seed)
    data, size = make_content(cs, seed)
    img = str(tmp_path / "o.qcow2")
    _create(img, version, cs, size)
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    await write_compressed(node, data, cs, rng)
    await graph.close_all()
    assert_clean(img)

    shadow = Shadow(data, cs, 2 if version == "v2" else 3, False)
    pat = random.Random(seed + 1).randbytes(4 * MiB + max(size, 4 * MiB))
    ops = random_ops(rng, size, 120, max_len=min(size, 3 * cs))
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    try:
        for i, batch in enumerate(batches(ops, rng)):
            await asyncio.gather(*(apply_op(node, op, pat) for op in batch))
            for op in batch:
                shadow.apply(op, pat)
            if i % 10 == 0:
                await node.flush()
        assert bytes(await node.read(0, size)) == bytes(shadow.data)
        # Clusters without host space (discarded, zeroed, never written) take compressed
        # data again; allocated ones refuse it.
        await node.flush()
        ents = await node.driver.map.entries_span(0, -(-size // cs))
        free = [i for i, e in enumerate(ents) if not e & _OFFSET_MASK]
        for i in free[:6]:
            start = i * cs
            end = min(size, start + cs)
            chunk = bytes(shadow.data[start:end])
            if chunk == bytes(len(chunk)):
                chunk = _cluster("pattern", i, cs, rng)[: end - start]
            await node.write(start, chunk, WriteFlags.COMPRESSED)
            shadow.data[start:end] = chunk
        taken = [i for i, e in enumerate(ents) if e & _OFFSET_MASK]
        if taken:
            i = taken[0]
            chunk = _cluster("pattern", i, cs, rng)[: min(cs, size - i * cs)]
            with pytest.raises(OSError) as ei:
                await node.write(i * cs, chunk, WriteFlags.COMPRESSED)
            assert ei.value.errno == errno.EIO
        assert bytes(await node.read(0, size)) == bytes(shadow.data)
    finally:
        await graph.close_all()
    assert_clean(img)
    compare_raw(img, bytes(shadow.data), tmp_path)
    compressed_clusters(img)  # descriptors still exact
    os.unlink(img)


async def test_freed_shared_cluster_is_not_packed_again(tmp_path):
    """A host cluster that held compressed data, was freed and then handed out whole to a
    normal write must not receive the next compressed cluster (it is no longer shared
    compressed space)."""
    cs = 65536
    img = str(tmp_path / "f.qcow2")
    _create(img, "v3", cs, 8 * cs)
    pattern = ((b"abc" * cs)[:cs], (b"xyz" * cs)[:cs])
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    try:
        await node.write(0, pattern[0], WriteFlags.COMPRESSED)  # a few bytes of host cluster H
        await node.write(0, b"\x01" * cs)  # H loses its only reference ...
        await node.flush()  # ... and is free now
        await node.write(cs, b"\x02" * cs)  # a normal write may take H whole
        await node.write(2 * cs, pattern[1], WriteFlags.COMPRESSED)
        want = b"\x01" * cs + b"\x02" * cs + pattern[1] + bytes(5 * cs)
        assert bytes(await node.read(0, 8 * cs)) == want
    finally:
        await graph.close_all()
    assert_clean(img)
    compare_raw(img, want, tmp_path)


async def test_refcount_bits_1(tmp_path):
    """With 1-bit refcounts a host cluster cannot be shared: every compressed cluster
    starts a fresh one."""
    cs = 4096
    img = str(tmp_path / "r1.qcow2")
    _create(img, "v3", cs, 32 * cs, "refcount_bits=1")
    data = b"".join(_cluster("pattern", i, cs, random.Random(i)) for i in range(32))
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    try:
        await write_compressed(node, data, cs, random.Random(1))
    finally:
        await graph.close_all()
    assert_clean(img)
    got = compressed_clusters(img)
    assert len(got) == 32
    _, ents = l2_entries(img)
    hosts = [(e & ((1 << (62 - (12 - 8))) - 1)) // cs for e in ents]
    assert len(set(hosts)) == 32
    compare_raw(img, data, tmp_path)


async def test_backing_file_and_fua(tmp_path):
    """Compressed writes into an overlay hide the backing file's clusters whole; FUA is
    honoured (the metadata is on disk when the write returns)."""
    cs = 65536
    base = str(tmp_path / "base.qcow2")
    img = str(tmp_path / "top.qcow2")
    qemu_img("create", "-f", "qcow2", base, str(4 * cs))
    basedata = random.Random(5).randbytes(4 * cs)
    graph = BlockGraph()
    bnode = await open_qcow2(graph, base)
    await bnode.write(0, basedata)
    await graph.close_all()
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", img, str(4 * cs))
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    try:
        chunk = _cluster("pattern", 1, cs, random.Random(0))
        await node.write(cs, chunk, WriteFlags.COMPRESSED | WriteFlags.FUA)
        # Visible to another reader at once (FUA flushed the L2 table).
        r = qemu_img("map", "-U", "--output=json", img)
        top = [e for e in json.loads(r.stdout) if e["depth"] == 0]
        assert [(e["start"], e["length"]) for e in top] == [(cs, cs)] and "offset" not in top[0]
    finally:
        await graph.close_all()
    assert_clean(img)
    want = basedata[:cs] + chunk + basedata[2 * cs :]
    compare_raw(img, want, tmp_path)


async def test_unsupported_driver_refuses(tmp_path):
    """A node whose driver cannot compress refuses the flag (QEMU: ENOTSUP)."""
    path = tmp_path / "r.raw"
    path.write_bytes(bytes(65536))
    graph = BlockGraph()
    node = await graph.add(
        options(
            {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": str(path)}}
        )
    )
    try:
        with pytest.raises(OSError) as ei:
            await node.write(0, b"\x07" * 65536, WriteFlags.COMPRESSED)
        assert ei.value.errno == errno.ENOTSUP
    finally:
        await graph.close_all()
    assert path.read_bytes() == bytes(65536)


async def test_zstd_compressed_write(tmp_path):
    """An image whose header says zstd gets zstd frames, which QEMU reads back."""
    cs = 65536
    data, size = make_content(cs, 3)
    img = str(tmp_path / "z.qcow2")
    _create(img, "v3", cs, size, "compression_type=zstd")
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    try:
        await write_compressed(node, data, cs, random.Random(2))
        assert bytes(await node.read(0, size)) == data
    finally:
        await graph.close_all()
    res = assert_clean(img)
    assert res["compressed-clusters"] > 0
    compare_raw(img, data, tmp_path)


# -- crash consistency -------------------------------------------------------------------------
_CRASH_CHILD = str(Path(__file__).resolve().parent / "qcow2_compressed_crash_child.py")
_CRASH_CONFIGS = [("1.1", 65536, 32), ("0.10", 4096, 128), ("1.1", 512, 128)]


async def _crash_run(tmp: Path, run: int) -> tuple[int, int]:
    from qcow2_compressed_crash_child import cluster_data, write_range

    compat, cs, n = _CRASH_CONFIGS[run % len(_CRASH_CONFIGS)]
    rng = random.Random(2000 + run)
    img = str(tmp / f"crash{run}.qcow2")
    size = n * cs
    qemu_img("create", "-f", "qcow2", "-o", f"compat={compat},cluster_size={cs}", img, str(size))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        _CRASH_CHILD,
        img,
        str(70 + run),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 30)
    if first.strip() != b"READY":
        _, err = await proc.communicate()
        raise AssertionError(f"child did not start: {first!r} {err.decode()[-2000:]}")
    await asyncio.sleep(rng.uniform(0.05, 0.6))
    proc.kill()
    out, err = await proc.communicate()
    assert proc.returncode == -9, err.decode()

    batches: list[list[tuple[str, int, int]]] = []
    durable = -1
    for line in out.decode().splitlines():
        if line.startswith("B "):
            batch = []
            for t in line[2:].split(";"):
                k, c, tag = t.split()
                batch.append((k, int(c), int(tag)))
            batches.append(batch)
        elif line.startswith("F "):
            durable = int(line[2:])
    res = check_image(img)
    assert res.get("corruptions", 0) == 0 and res.get("check-errors", 0) == 0, (run, res)
    assert res["rc"] in (0, 3), (run, res)

    shadow = bytearray(size)
    uncertain = bytearray(size)
    for i, batch in enumerate(batches):
        for k, c, tag in batch:
            if k == "w":
                off, data = write_range(cs, c, tag)
            else:
                off, data = c * cs, cluster_data(cs, c, tag) if k == "c" else bytes(cs)
            if i <= durable:
                shadow[off : off + len(data)] = data
            else:
                uncertain[off : off + len(data)] = b"\x01" * len(data)
    raw = tmp / f"crash{run}.raw"
    qemu_img("convert", "-O", "raw", img, str(raw))
    got = raw.read_bytes()
    raw.unlink()
    bad = [j for j in range(size) if got[j] != shadow[j] and not uncertain[j]]
    assert not bad, f"run {run}: flushed data lost at {bad[:5]} (durable batch {durable})"
    os.unlink(img)
    return durable, len(batches)


async def test_kill_9_during_compressed_writes(tmp_path):
    """SIGKILL in the middle of compressed writes, overwrites and discards: no corruption
    (leaks allowed), flushed data intact."""
    results = [await _crash_run(tmp_path, run) for run in range(6)]
    assert sum(1 for durable, issued in results if 0 <= durable < issued - 1) >= 3, results
