"""Every subformat ``qemu-img create -f vmdk`` makes, with random data and holes, read over
an NBD export of blockd and compared with qemu-img's own reading; block status
(``qemu-img map``, ``nbdinfo --map``, ``qemu:allocation-depth``) equal to
qemu-storage-daemon's export of the same image. Then deltas: a vmdk parent, a parent whose
CID no longer matches, and a vmfsSparse (COWD) extent."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest
from imagegen import build_vmdk3
from nbdtest import RawNbd
from support import qemu_img, qemu_io
from vmdktest import (
    GiB,
    MiB,
    Pair,
    cid_of,
    descriptor_of,
    fill,
    nbd_map,
    random_source,
    same_data,
    views,
    vmdk_node,
)

from blockd.nbd import protocol as P

# The twoGbMaxExtent subformats split at 2 GiB: this size makes two extents, the second short.
SIZE = 2 * GiB + 64 * MiB + 512 * 3


def _subformat_image(tmp: Path, subformat: str, rng: random.Random) -> Path:
    img = tmp / f"{subformat}.vmdk"
    src = random_source(tmp / "src.bin", rng)
    if subformat == "streamOptimized":
        # Made as users make them: converted from a raw disk (compressed grains, holes left
        # out); the raw disk has data on both sides of the 2 GiB mark and zero runs.
        raw = tmp / "conv.raw"
        with open(raw, "wb") as f:
            f.truncate(SIZE)
        fill(raw, SIZE, rng, src, zero=False, fmt="raw")
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, img)
        raw.unlink()
        return img
    opts = f"subformat={subformat.split('+')[0]}"
    if subformat.endswith("+zeroed"):
        opts += ",zeroed_grain=on"
        img = tmp / "zeroed.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", opts, img, str(SIZE))
    fill(img, SIZE, rng, src)
    # Data across the 2 GiB boundary of the split subformats, and up to the last byte.
    qemu_io(
        "-f",
        "vmdk",
        "-c",
        f"write -s {src} {2 * GiB - 5000} 10000",
        "-c",
        f"write -s {src} {SIZE - 777} 777",
        img,
    )
    return img


SUBFORMATS = [
    "monolithicSparse",
    "monolithicSparse+zeroed",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
]


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_subformat_reads_and_maps_as_qsd(pair: Pair, tmp_path: Path, subformat: str) -> None:
    rng = random.Random(subformat)
    img = _subformat_image(tmp_path, subformat, rng)
    node = subformat.replace("+", "-")
    pair.add_ok(vmdk_node(node, img, **{"read-only": True}))
    uris = pair.export(node)
    same_data(uris["blockd"], img, "vmdk")
    v = views(uris)
    assert v["blockd"] == v["qsd"]
    blockd_map = v["blockd"]["nbdinfo"]
    assert "data" in blockd_map and ("hole" in blockd_map or "zero" in blockd_map)
    if subformat.endswith("+zeroed"):
        assert "hole,zero" in blockd_map  # zeroed grains
    pair.drop(node)


def _delta(tmp: Path, rng: random.Random, size: int) -> tuple[Path, Path]:
    src = random_source(tmp / "src.bin", rng)
    base = tmp / "base.vmdk"
    qemu_img("create", "-f", "vmdk", base, str(size))
    fill(base, size, rng, src, ops=8)
    # A relative parentFileNameHint, resolved next to the delta.
    top = tmp / "top.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "zeroed_grain=on", "-b", base.name, "-F", "vmdk", top)
    fill(top, size, rng, src, ops=8)
    return base, top


def test_delta_over_vmdk_parent(pair: Pair, tmp_path: Path) -> None:
    rng = random.Random(5)
    _base, top = _delta(tmp_path, rng, 24 * MiB + 512)
    pair.add_ok(vmdk_node("top", top, **{"read-only": True}))
    uris = pair.export("top")
    same_data(uris["blockd"], top, "vmdk")
    v = views(uris)
    assert v["blockd"] == v["qsd"]
    assert "backing depth 2" in v["blockd"]["depth"], v["blockd"]["depth"]
    info = {side: pair.named_node(side, "top") for side in ("blockd", "qsd")}
    for key in ("backing_file", "backing_file_depth"):
        assert info["blockd"][key] == info["qsd"][key]
    for key in ("backing-filename", "full-backing-filename", "backing-filename-format"):
        assert info["blockd"]["image"][key] == info["qsd"]["image"][key], key
    pair.drop("top")


def test_parent_cid_mismatch_fails_unallocated_reads(pair: Pair, tmp_path: Path) -> None:
    """A parent written after the delta was taken (its CID changed): allocated ranges read,
    unallocated ones fail with EINVAL, in both daemons."""
    rng = random.Random(6)
    base, top = _delta(tmp_path, rng, 8 * MiB)
    qemu_io("-f", "vmdk", "-c", "write -P 0x5a 0 64k", top)
    qemu_io("-f", "vmdk", "-c", "write -P 1 7M 4k", base)  # a new CID for the parent
    assert cid_of(descriptor_of(top), "parentCID") != cid_of(descriptor_of(base))
    pair.add_ok(vmdk_node("mm", top, **{"read-only": True}))
    pair.export("mm")
    errs = {}
    for side in ("blockd", "qsd"):
        c = RawNbd(str(pair.nbd[side]))
        c.go("mm", structured=False)
        assert c.read(0, 65536) == b"\x5a" * 65536
        errs[side] = c.request(P.CMD_READ, 6 * MiB, 4096)["error"]
        c.disconnect()
    assert errs == {"blockd": errno.EINVAL, "qsd": errno.EINVAL}, errs
    pair.drop("mm")


def test_vmfs_sparse_cowd_extent(pair: Pair, tmp_path: Path) -> None:
    """vmfsSparse: a descriptor naming a COWD extent (VMDK3), 32-bit tables of 4096 entries."""
    rng = random.Random(9)
    size = 3 * MiB
    grains = {g: rng.randbytes(4096) for g in rng.sample(range(size // 4096), 40)}
    desc, want = build_vmdk3(tmp_path, "cowd", size, grains)
    out = tmp_path / "cowd.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", desc, out)
    assert out.read_bytes() == want
    pair.add_ok(vmdk_node("cowd", desc, **{"read-only": True}))
    uris = pair.export("cowd")
    same_data(uris["blockd"], out)
    v = views(uris)
    assert v["blockd"] == v["qsd"]
    pair.drop("cowd")


def _mixed(tmp: Path, zero_line: str = "") -> tuple[Path, bytes]:
    """A descriptor of hand-made extents: FLAT at a sector offset into a shared file, VMFS,
    a sparse extent made by qemu-img, FLAT again; the guest bytes it reads as."""
    rng = random.Random(12)
    shared = rng.randbytes(3 * MiB)
    (tmp / "shared.bin").write_bytes(shared)
    vmfs = rng.randbytes(MiB)
    (tmp / "vmfs.bin").write_bytes(vmfs)
    qemu_img("create", "-q", "-f", "vmdk", tmp / "sp.vmdk", "2M")
    qemu_io("-f", "vmdk", "-c", "write -P 0x3c 64k 100k", tmp / "sp.vmdk")
    sparse = bytearray(2 * MiB)
    sparse[65536 : 65536 + 100 * 1024] = b"\x3c" * (100 * 1024)
    (tmp / "mixed.vmdk").write_text(
        "# Disk DescriptorFile\nversion=1\nCID=abcdef01\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n# Extent description\n'
        'RW 2048 FLAT "shared.bin" 1024\n'
        'RW 2048 VMFS "vmfs.bin"\n'
        f"{zero_line}"
        'RW 4096 SPARSE "sp.vmdk"\n'
        'RW 1024 FLAT "shared.bin" 0\n'
    )
    want = shared[512 * 1024 : 1536 * 1024] + vmfs
    want += bytes(512 * int(zero_line.split()[1])) if zero_line else b""
    return tmp / "mixed.vmdk", want + bytes(sparse) + shared[: 512 * 1024]


def test_mixed_extents(pair: Pair, tmp_path: Path) -> None:
    desc, want = _mixed(tmp_path)
    (tmp_path / "want.raw").write_bytes(want)
    pair.add_ok(vmdk_node("mixed", desc, **{"read-only": True}))
    uris = pair.export("mixed")
    same_data(uris["blockd"], tmp_path / "want.raw")
    same_data(uris["qsd"], tmp_path / "want.raw")
    v = views(uris)
    assert v["blockd"] == v["qsd"]
    pair.drop("mixed")


def test_zero_extent(pair: Pair, tmp_path: Path) -> None:
    """VMware's ``RW <sectors> ZERO`` lines read as zeroes where they stand (QEMU skips
    them, so every later extent moves up: a deliberate difference, docs/compatibility.md)."""
    desc, want = _mixed(tmp_path, "RW 300 ZERO\n")
    (tmp_path / "want.raw").write_bytes(want)
    res = pair.cmd("blockd", "blockdev-add", vmdk_node("z", desc, **{"read-only": True}))
    assert "return" in res, res
    pair.qmp["blockd"].run("block-export-add", {"type": "nbd", "id": "z", "node-name": "z"})
    u = f"nbd+unix:///z?socket={pair.nbd['blockd']}"
    same_data(u, tmp_path / "want.raw")
    assert "hole,zero" in nbd_map(u) or "zero" in nbd_map(u)
    pair.unexport("blockd", "z")
    pair.qmp["blockd"].run("blockdev-del", {"node-name": "z"})
