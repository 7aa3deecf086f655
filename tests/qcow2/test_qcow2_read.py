"""Reading qemu-made qcow2 images through blockd must give the bytes ``qemu-img convert -O raw``
gives: v2/v3, cluster sizes 512 B..2 MiB, backing chains of depth 3, compressed and zero
clusters."""

from __future__ import annotations

import json
import random

import pytest
from qcow2_helpers import MiB, backed_qcow2, open_qcow2, qemu_img, qemu_io, to_raw

from blockd.block.graph import BlockGraph
from blockd.errors import QmpError


async def _read_all(node, rng: random.Random) -> bytes:
    out = bytearray()
    pos = 0
    while pos < node.length:
        n = min(node.length - pos, rng.choice([1, 511, 4096, 65537, MiB + 3, 3 * MiB]))
        out += await node.read(pos, n)
        pos += n
    return bytes(out)


def _fill(path: str, size: int, rng: random.Random, fmt: str = "qcow2") -> None:
    cmds = []
    for _ in range(12):
        off = rng.randrange(0, size - 1)
        n = min(size - off, rng.randint(1, size // 6))
        kind = rng.random()
        if kind < 0.6:
            cmds.append(f"write -P {rng.randint(1, 255)} {off} {n}")
        elif kind < 0.8:
            a = off - off % 512
            cmds.append(f"write -z {a} {max(512, n - n % 512)}" if a + 512 <= size else "")
        else:
            a = off - off % 512
            cmds.append(f"discard {a} {max(512, n - n % 512)}" if a + 512 <= size else "")
    qemu_io(path, *[c for c in cmds if c], fmt=fmt)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster", [512, 4096, 65536, 2 * MiB])
async def test_read_matrix_chain_of_three(tmp_path, compat, cluster):
    rng = random.Random(f"{compat}-{cluster}")
    size = 6 * MiB if cluster < 2 * MiB else 12 * MiB
    paths = []
    for depth in range(3):
        p = str(tmp_path / f"l{depth}.qcow2")
        args = ["create", "-f", "qcow2", "-o", f"compat={compat},cluster_size={cluster}"]
        if paths:
            # The middle layer names its backing relatively, resolved against its directory.
            args += ["-b", paths[-1].rsplit("/", 1)[1], "-F", "qcow2"]
        # Layers of different lengths: reads past a shorter backing give zeroes.
        qemu_img(*args, p, str(size - (2 - depth) * MiB))
        _fill(p, size - (2 - depth) * MiB, rng)
        paths.append(p)
    graph = BlockGraph()
    node = await open_qcow2(graph, paths[-1], rw=False)
    assert len(node.backing_chain()) == 3
    got = await _read_all(node, rng)
    await graph.close_all()
    assert got == to_raw(paths[-1], str(tmp_path / "out.raw"))


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster", [512, 65536])
async def test_read_compressed(tmp_path, compat, cluster):
    rng = random.Random(cluster)
    src = str(tmp_path / "src.raw")
    img = str(tmp_path / "c.qcow2")
    blob = bytearray()
    for _ in range(64):
        kind = rng.random()
        chunk = rng.randint(1, 100_000)
        if kind < 0.3:
            blob += rng.randbytes(chunk)  # incompressible: stored compressed anyway or raw
        elif kind < 0.6:
            blob += bytes([rng.randint(0, 255)]) * chunk
        else:
            blob += (b"blockd qcow2 %d " % rng.randint(0, 99)) * (chunk // 16)
    blob += bytes(-len(blob) % 512)
    with open(src, "wb") as f:
        f.write(blob)
    qemu_img(
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        f"compat={compat},cluster_size={cluster}",
        "-f",
        "raw",
        src,
        img,
    )
    graph = BlockGraph()
    node = await open_qcow2(graph, img, rw=False)
    got = await _read_all(node, rng)
    await graph.close_all()
    assert got == bytes(blob)
    assert got == to_raw(img, str(tmp_path / "out.raw"))


async def test_read_zero_clusters_over_backing(tmp_path):
    _, img = backed_qcow2(
        tmp_path,
        "4M",
        ("write -P 0x33 0 4M",),
        ("write -z 64k 128k", "write -z -u 1M 1M", "write -P 0x44 1088k 4k"),
    )
    graph = BlockGraph()
    node = await open_qcow2(graph, img, rw=False)
    got = bytes(await node.read(0, 4 * MiB))
    await graph.close_all()
    assert got == to_raw(img, str(tmp_path / "out.raw"))
    assert got[64 * 1024 : 192 * 1024] == bytes(128 * 1024)
    assert got[: 64 * 1024] == b"\x33" * 65536


async def test_backing_option_overrides_header(tmp_path):
    base, img = backed_qcow2(tmp_path, "1M", ("write -P 0x33 0 1M",))
    graph = BlockGraph()
    node = await open_qcow2(graph, img, rw=False, backing=None)
    assert node.backing is None
    assert bytes(await node.read(0, 4096)) == bytes(4096)
    assert node.driver.backing_file_name == base
    info = node.driver.image_info()
    assert info["backing-filename"] == base and info["backing-filename-format"] == "qcow2"
    await graph.close_all()

    graph = BlockGraph()
    await graph.add(
        __import__("qcow2_helpers").options(
            {
                "driver": "qcow2",
                "node-name": "b",
                "read-only": True,
                "file": {"driver": "file", "filename": base},
            }
        )
    )
    node = await open_qcow2(graph, img, rw=False, name="t", backing="b")
    assert node.backing is graph.find("b")
    assert bytes(await node.read(0, 4096)) == b"\x33" * 4096
    await graph.close_all()

    graph = BlockGraph()
    with pytest.raises(QmpError, match="Could not open backing file: Cannot find device="):
        await open_qcow2(graph, img, rw=False, backing="nonexist")


async def test_missing_backing_and_probe(tmp_path):
    base = str(tmp_path / "base.raw")
    img = str(tmp_path / "top.qcow2")
    with open(base, "wb") as f:
        f.write(b"\x21" * MiB)
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", img, "1M")
    # Turn the backing format extension into an unknown (ignored) one: blockd then probes
    # the backing file's format by its magic.
    with open(img, "r+b") as f:
        head = f.read(4096)
        pos = head.index(bytes.fromhex("e2792aca"))
        f.seek(pos)
        f.write(bytes.fromhex("0badf00d"))
    graph = BlockGraph()
    node = await open_qcow2(graph, img, rw=False)
    assert node.backing is not None and node.backing.drv == "raw"
    assert bytes(await node.read(0, 10)) == b"\x21" * 10
    await graph.close_all()
    (tmp_path / "base.raw").unlink()
    graph = BlockGraph()
    with pytest.raises(QmpError, match="Could not open backing file: Could not open"):
        await open_qcow2(graph, img, rw=False)
    assert not graph.nodes


async def test_zstd_compressed_clusters_read_like_qemu_img(tmp_path):
    src = tmp_path / "src.raw"
    rnd = random.Random(5)
    src.write_bytes(rnd.randbytes(MiB) + bytes(MiB) + b"blockd" * 100000 + rnd.randbytes(4321))
    img = str(tmp_path / "z.qcow2")
    qemu_img(
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd,cluster_size=4096",
        str(src),
        img,
    )
    chk = json.loads(qemu_img("check", "--output=json", img).stdout)
    assert chk["compressed-clusters"] > 0, chk
    graph = BlockGraph()
    node = await open_qcow2(graph, img, rw=False)
    got = bytes(await node.read(0, node.length))
    await graph.close_all()
    assert got == to_raw(img, str(tmp_path / "out.raw"))


async def test_refusals(tmp_path):
    img = str(tmp_path / "a.qcow2")
    graph = BlockGraph()
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", img, "1M")
    with pytest.raises(QmpError, match="extended L2"):
        await open_qcow2(graph, img, rw=False)
    qemu_img("create", "-f", "qcow2", "-o", "data_file=" + str(tmp_path / "d.raw"), img, "1M")
    with pytest.raises(QmpError, match="external data file"):
        await open_qcow2(graph, img, rw=False)
    qemu_img("create", "-f", "qcow2", img, "1M")
    qemu_img("snapshot", "-c", "snap1", img)
    with pytest.raises(QmpError, match="internal snapshots"):
        await open_qcow2(graph, img)
    node = await open_qcow2(graph, img, rw=False)
    assert bytes(await node.read(0, 512)) == bytes(512)
    await graph.close_all()
    raw = str(tmp_path / "r.raw")
    with open(raw, "wb") as f:
        f.write(bytes(4096))
    graph = BlockGraph()
    with pytest.raises(QmpError, match="Image is not in qcow2 format"):
        await open_qcow2(graph, raw, rw=False)


@pytest.mark.parametrize("method", [1, 2])
async def test_encrypted_refused(tmp_path, method):
    """crypt_method set in the header (AES or LUKS): refused with a message naming it.

    The header field is patched in, since creating a LUKS image needs a CPU timer that
    some sandboxes lack."""
    img = str(tmp_path / "e.qcow2")
    qemu_img("create", "-f", "qcow2", img, "1M")
    with open(img, "r+b") as f:
        f.seek(32)
        f.write(method.to_bytes(4, "big"))
    graph = BlockGraph()
    with pytest.raises(QmpError, match="encrypted"):
        await open_qcow2(graph, img, rw=False)


async def test_zero_flag_in_v2_image_is_an_io_error(tmp_path):
    """Version 2 has no zero clusters; QEMU fails the read rather than guess (so does blockd,
    for reads and block status alike)."""
    import struct

    img = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(img), "1M")
    qemu_io(str(img), "write -P 7 0 64k")
    raw = bytearray(img.read_bytes())
    l1_off = struct.unpack_from(">Q", raw, 40)[0]
    l2_off = struct.unpack_from(">Q", raw, l1_off)[0] & 0x00FFFFFFFFFFFE00
    entry = struct.unpack_from(">Q", raw, l2_off)[0]
    struct.pack_into(">Q", raw, l2_off, entry | 1)
    img.write_bytes(raw)
    graph = BlockGraph()
    node = await open_qcow2(graph, str(img), rw=False)
    with pytest.raises(OSError, match="version 2"):
        await node.read(0, 512)
    with pytest.raises(OSError, match="version 2"):
        await node.block_status(0, 512)
    assert bytes(await node.read(65536, 512)) == bytes(512)
    await graph.close_all()
