"""qcow2 writes through blockd: a random workload against a raw shadow, copy-on-write from a
backing file, resize, and the invariants ``qemu-img check`` verifies."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from qcow2_helpers import (
    MiB,
    Shadow,
    apply_op,
    backed_qcow2,
    batches,
    check_image,
    open_qcow2,
    pattern,
    qemu_img,
    qemu_io,
    random_ops,
    to_raw,
)

from blockd.block.graph import BlockGraph
from blockd.block.status import BlockStatus

SIZE = 32 * MiB


def write_sparse(path: object, data: bytes, block: int = 65536) -> None:
    """Write *data* leaving all-zero blocks as holes: CI machines may have little disk."""
    zero = bytes(block)
    with open(str(path), "wb") as f:
        for pos in range(0, len(data), block):
            chunk = data[pos : pos + block]
            if chunk != zero[: len(chunk)]:
                f.seek(pos)
                f.write(chunk)
        f.truncate(len(data))


@pytest.mark.parametrize(
    ("version", "cluster", "backing", "seed", "cache"),
    [
        ("v2", 65536, False, 1, {}),
        # Tiny caches: L2 tables and refcount blocks are evicted (written back) all the time.
        ("v2", 4096, True, 2, {"l2-cache-size": 16384, "refcount-cache-size": 8192}),
        ("v3", 65536, True, 3, {}),
        ("v3", 512, False, 4, {"l2-cache-size": 65536, "refcount-cache-size": 16384}),
    ],
)
async def test_random_workload(tmp_path, version, cluster, backing, seed, cache):
    rng = random.Random(seed)
    img = str(tmp_path / "img.qcow2")
    compat = "0.10" if version == "v2" else "1.1"
    initial = bytes(SIZE)
    if backing:
        base = str(tmp_path / "base.raw")
        write_sparse(base, pattern(seed + 100, SIZE - 5 * MiB))  # shorter than the overlay
        initial = pattern(seed + 100, SIZE - 5 * MiB) + bytes(5 * MiB)
        qemu_img(
            "create",
            "-f",
            "qcow2",
            "-o",
            f"compat={compat},cluster_size={cluster}",
            "-b",
            base,
            "-F",
            "raw",
            img,
            str(SIZE),
        )
    else:
        qemu_img(
            "create", "-f", "qcow2", "-o", f"compat={compat},cluster_size={cluster}", img, str(SIZE)
        )
    pat = pattern(seed)
    ops = random_ops(rng, SIZE, 2000)
    shadow = Shadow(initial, cluster, 2 if version == "v2" else 3, backing)
    graph = BlockGraph()
    node = await open_qcow2(graph, img, **cache)
    for i, batch in enumerate(batches(ops, rng)):
        await asyncio.gather(*(apply_op(node, op, pat) for op in batch))
        for op in batch:
            shadow.apply(op, pat)
        if i % 97 == 0:
            await node.flush()
    # Read back through blockd before closing, in odd-sized pieces.
    pos = 0
    while pos < SIZE:
        n = min(SIZE - pos, rng.randint(1, 3 * MiB))
        got = await node.read(pos, n)
        assert bytes(got) == shadow.data[pos : pos + n], f"mismatch at {pos}"
        pos += n
    await graph.close_all()
    res = check_image(img)
    assert res["rc"] == 0, res
    assert res.get("leaks", 0) == 0 and res.get("corruptions", 0) == 0, res
    shadow_path = tmp_path / "shadow.raw"
    write_sparse(shadow_path, shadow.data)
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", img, str(shadow_path), check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


async def test_cow_from_backing_seed_134(tmp_path):
    """Seed test 134: 512 bytes at 512 over a backing file with a pattern."""
    _, img = backed_qcow2(tmp_path, "1M", ("write -P 0xa5 0 1M",))
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    await node.write(512, b"\x5a" * 512)
    data = bytes(await node.read(0, 65536 + 1024))
    assert data[:512] == b"\xa5" * 512
    assert data[512:1024] == b"\x5a" * 512
    assert data[1024:] == b"\xa5" * (len(data) - 1024)
    await graph.close_all()
    assert check_image(img)["rc"] == 0
    raw = to_raw(img, str(tmp_path / "out.raw"))
    assert raw[:512] == b"\xa5" * 512 and raw[512:1024] == b"\x5a" * 512
    assert raw[1024:] == b"\xa5" * (1024 * 1024 - 1024)
    # Only the written cluster is allocated in the overlay.
    m = json.loads(qemu_img("map", "--output=json", img).stdout)
    top = [e for e in m if e["depth"] == 0]
    assert len(top) == 1 and top[0]["start"] == 0 and top[0]["length"] == 65536


async def test_cow_zero_fill_without_backing(tmp_path):
    img = str(tmp_path / "a.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    await node.write(512, b"\x5a" * 512)
    data = bytes(await node.read(0, 65536))
    assert data == bytes(512) + b"\x5a" * 512 + bytes(65536 - 1024)
    await graph.close_all()
    assert check_image(img)["rc"] == 0


async def test_block_status_matches_qemu_map(tmp_path):
    _, img = backed_qcow2(
        tmp_path,
        "4M",
        ("write -P 1 0 1M",),
        ("write -P 2 64k 192k", "write -z 512k 128k", "write -P 3 2M 64k"),
    )
    graph = BlockGraph()
    node = await open_qcow2(graph, img, rw=False)
    qmap = json.loads(qemu_img("map", "--output=json", img).stdout)
    for e in qmap:
        ext = await node.block_status_above(e["start"], e["length"])
        assert ext.offset == e["start"]
        assert ext.depth == e["depth"], (e, ext)
        assert bool(ext.flags & BlockStatus.ZERO) == e["zero"], (e, ext)
        assert bool(ext.flags & BlockStatus.DATA) == e["data"], (e, ext)
        if "offset" in e:
            assert ext.map_offset == e["offset"], (e, ext)
    await graph.close_all()


async def test_truncate_grow(tmp_path):
    base = str(tmp_path / "base.raw")
    img = str(tmp_path / "top.qcow2")
    with open(base, "wb") as f:
        f.write(b"\x77" * (3 * MiB))
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", "-b", base, "-F", "raw", img, "1M")
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    await node.write(1000, b"x" * 100)
    await node.truncate(40 * MiB)
    assert node.length == 40 * MiB
    await node.write(39 * MiB, b"y" * 5000)
    data = bytes(await node.read(0, 40 * MiB))
    await graph.close_all()
    assert check_image(img)["rc"] == 0
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["virtual-size"] == 40 * MiB
    raw = to_raw(img, str(tmp_path / "out.raw"))
    assert raw == data
    # The grown part reads as zeroes, not as the (longer) backing file.
    assert raw[MiB : 3 * MiB] == bytes(2 * MiB)
    assert raw[39 * MiB : 39 * MiB + 5000] == b"y" * 5000


async def test_refcount_table_growth(tmp_path):
    """512-byte clusters and 64-bit refcounts: every 64 clusters need a new refcount block,
    and the one-cluster table fills after 64 blocks."""
    img = str(tmp_path / "a.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, "16M")
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    pat = pattern(7, 4 * MiB)
    await node.write(3, pat)
    await node.write(12 * MiB + 7, pat[:MiB])
    await node.flush()
    assert bytes(await node.read(3, 4 * MiB)) == pat
    await graph.close_all()
    res = check_image(img)
    assert res["rc"] == 0, res
    raw = to_raw(img, str(tmp_path / "o.raw"))
    assert raw[3 : 3 + 4 * MiB] == pat
    assert raw[12 * MiB + 7 : 13 * MiB + 7] == pat[:MiB]


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
async def test_refcount_widths(tmp_path, bits):
    img = str(tmp_path / "a.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size=4096,refcount_bits={bits}", img, "8M")
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    pat = pattern(bits, 3 * MiB)
    await node.write(100, pat)
    await node.write_zeroes(MiB, MiB)
    await node.discard(2 * MiB, 512 * 1024)
    await node.write(2 * MiB + 4096, b"q" * 10000)
    await graph.close_all()
    res = check_image(img)
    assert res["rc"] == 0, res
    raw = to_raw(img, str(tmp_path / "o.raw"))
    assert raw[100:MiB] == pat[: MiB - 100]
    assert raw[MiB : 2 * MiB] == bytes(MiB)
    assert raw[2 * MiB + 4096 : 2 * MiB + 14096] == b"q" * 10000


async def test_overwrite_compressed_cluster(tmp_path):
    src = str(tmp_path / "src.qcow2")
    img = str(tmp_path / "c.qcow2")
    qemu_img("create", "-f", "qcow2", src, "2M")
    qemu_io(src, "write -P 9 0 2M")
    qemu_img("convert", "-c", "-O", "qcow2", src, img)
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    await node.write(70000, b"k" * 1000)
    await node.write_zeroes(0, 65536)
    await graph.close_all()
    res = check_image(img)
    assert res["rc"] == 0, res
    raw = to_raw(img, str(tmp_path / "o.raw"))
    expect = bytearray(b"\x09" * (2 * MiB))
    expect[70000:71000] = b"k" * 1000
    expect[:65536] = bytes(65536)
    assert raw == expect


async def test_concurrent_writes_into_one_cluster(tmp_path):
    """Non-overlapping writes into the same unallocated clusters run concurrently: the second
    must wait for the first one's allocation, not allocate the cluster again."""
    base = str(tmp_path / "base.raw")
    img = str(tmp_path / "top.qcow2")
    with open(base, "wb") as f:
        f.write(b"\x11" * MiB)
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", img, "1M")
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    rng = random.Random(5)
    offs = list(range(0, 256 * 1024, 1000))
    rng.shuffle(offs)
    await asyncio.gather(*(node.write(o + 100, bytes([o % 251 + 1]) * 700) for o in offs))
    expect = bytearray(b"\x11" * MiB)
    for o in offs:
        expect[o + 100 : o + 800] = bytes([o % 251 + 1]) * 700
    assert bytes(await node.read(0, MiB)) == expect
    await graph.close_all()
    res = check_image(img)
    assert res["rc"] == 0, res
    assert to_raw(img, str(tmp_path / "o.raw")) == expect


async def test_corrupt_and_dirty_bits(tmp_path):
    from blockd.errors import QmpError

    img = str(tmp_path / "a.qcow2")
    for bit, text in ((2, "corrupt"), (1, "dirty bit")):
        qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "1M")
        qemu_io(img, "write -P 7 0 4k")
        with open(img, "r+b") as f:
            f.seek(72)
            f.write(bit.to_bytes(8, "big"))
        graph = BlockGraph()
        with pytest.raises(QmpError, match=text):
            await open_qcow2(graph, img)
        node = await open_qcow2(graph, img, rw=False)
        assert bytes(await node.read(0, 4096)) == b"\x07" * 4096
        info = node.driver.image_info()
        assert info["format-specific"]["data"]["corrupt"] == (bit == 2)
        assert info["dirty-flag"] == (bit == 1)
        assert info["format-specific"]["data"]["lazy-refcounts"] is True
        await graph.close_all()


async def test_discard_passes_down_to_file(tmp_path):
    img = str(tmp_path / "a.qcow2")
    qemu_img("create", "-f", "qcow2", img, "8M")
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    await node.write(0, pattern(3, 8 * MiB))
    await node.flush()
    before = node.driver.actual_size()
    await node.discard(0, 8 * MiB)
    await node.flush()
    after = node.driver.actual_size()
    assert after is not None and before is not None and after < before - 6 * MiB
    assert bytes(await node.read(0, 8 * MiB)) == bytes(8 * MiB)
    await node.write(MiB + 5, b"again")
    await graph.close_all()
    res = check_image(img)
    assert res["rc"] == 0, res
    raw = to_raw(img, str(tmp_path / "o.raw"))
    assert raw[MiB + 5 : MiB + 10] == b"again" and raw.count(0) == 8 * MiB - 5


async def test_rewrite_header_keeps_extensions(tmp_path):
    """Cluster 0 rewritten from the live state keeps every extension (here a persistent
    bitmap made by qemu-img, which blockd loads, resizes and stores again) and the backing
    file name."""
    base, img = backed_qcow2(tmp_path, "4M")
    qemu_img("bitmap", "--add", img, "bm0")
    before = json.loads(qemu_img("info", "--output=json", img).stdout)
    graph = BlockGraph()
    node = await open_qcow2(graph, img)
    await node.write(0, b"z" * 70000)
    await node.truncate(8 * MiB)
    await node.driver.rewrite_header()
    await graph.close_all()
    after = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert (
        after["format-specific"]["data"]["bitmaps"] == before["format-specific"]["data"]["bitmaps"]
    )
    assert after["backing-filename"] == base and after["virtual-size"] == 8 * MiB
    assert after["backing-filename-format"] == "qcow2"
    res = check_image(img)
    assert res["rc"] == 0 and not res.get("leaks"), res
