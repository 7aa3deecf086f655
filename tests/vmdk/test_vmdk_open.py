"""Opening vmdk images that qemu-storage-daemon refuses: the VMDK4 header checks (the 32 Mi
L1 bound included), descriptor and extent errors, the parent; each one refused by blockd
with QSD's class and text, in the same run, and no image changed. Then what both show for
images that open: ``query-named-block-nodes`` and the format probe."""

from __future__ import annotations

import errno
import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from imagegen import set_field
from nbdtest import RawNbd
from support import qemu_img, qemu_io
from vmdktest import MiB, Pair, vmdk_node

from blockd.nbd import protocol as P

GRAIN_SECTORS = 128
GD_SPAN = 512 * GRAIN_SECTORS  # sectors one grain directory entry covers


def _sparse(tmp: Path, name: str = "base.vmdk", size: int = 8 * MiB, opts: str = "") -> Path:
    img = tmp / name
    qemu_img("create", "-f", "vmdk", *(["-o", opts] if opts else []), img, str(size))
    qemu_io("-f", "vmdk", "-c", "write -P 7 0 200k", "-c", "write -P 8 5M 64k", img)
    return img


def _mutated(tmp: Path, fields: dict[str, int], opts: str = "") -> Path:
    img = _sparse(tmp, opts=opts)
    data = bytearray(img.read_bytes())
    for name, value in fields.items():
        set_field(data, name, value)
    img.write_bytes(bytes(data))
    return img


def _descriptor(tmp: Path, text: str, flat_size: int = MiB) -> Path:
    (tmp / "d-flat.vmdk").write_bytes(b"\x11" * flat_size)
    desc = tmp / "d.vmdk"
    desc.write_text(text)
    return desc


DESC = (
    "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
    'createType="{ct}"\n\n# Extent description\n{lines}\n'
)


def _desc_case(lines: str, ct: str = "monolithicFlat", head: str = "") -> Callable[[Path], Path]:
    return lambda tmp: _descriptor(tmp, head + DESC.format(ct=ct, lines=lines))


def _orphan(tmp: Path) -> Path:
    """A descriptor over a sparse extent whose parent does not exist."""
    _sparse(tmp)
    text = DESC.format(ct="twoGbMaxExtentSparse", lines='RW 16384 SPARSE "base.vmdk"')
    return _descriptor(tmp, text + 'parentFileNameHint="gone.vmdk"\n')


# (what, image builder, read-only)
CASES: list[tuple[str, Callable[[Path], Path], bool]] = [
    ("version 4", lambda t: _mutated(t, {"version": 4}), True),
    ("version 3 read/write", lambda t: _mutated(t, {"version": 3}), False),
    ("L2 table size 513", lambda t: _mutated(t, {"num_gtes_per_gt": 513}), True),
    ("no grain table entries", lambda t: _mutated(t, {"num_gtes_per_gt": 0}), True),
    ("granularity 0", lambda t: _mutated(t, {"granularity": 0}), True),
    ("granularity 0x200001", lambda t: _mutated(t, {"granularity": 0x200001}), True),
    ("grain offset past EOF", lambda t: _mutated(t, {"grain_offset": 1 << 20}), True),
    # 2^25 + 1 directory entries of 512 grains of 64 KiB: one past the bound.
    ("L1 size too big", lambda t: _mutated(t, {"capacity": (1 << 25) * GD_SPAN + 1}), True),
    ("L1 table past 2^63", lambda t: _mutated(t, {"gd_offset": 1 << 54}), True),
    ("backup L1 table past 2^63", lambda t: _mutated(t, {"rgd_offset": (1 << 54) + 8}), True),
    ("footer marker missing", lambda t: _mutated(t, {"gd_offset": 2**64 - 1}), True),
    ("empty createType", _desc_case('RW 2048 FLAT "d-flat.vmdk" 0', ct=""), True),
    (
        "descriptor without createType",
        lambda t: _descriptor(t, 'version=1\nCID=1\nparentCID=1\nRW 2048 FLAT "d-flat.vmdk" 0\n'),
        True,
    ),
    ("unknown createType", _desc_case('RW 2048 FLAT "d-flat.vmdk" 0', ct="seSparseX"), True),
    ("flat line without offset", _desc_case('RW 2048 FLAT "d-flat.vmdk"'), True),
    ("VMFS line with offset", _desc_case('RW 2048 VMFS "d-flat.vmdk" 0', ct="vmfs"), True),
    ("sparse line with offset", _desc_case('RW 2048 SPARSE "d-flat.vmdk" 0'), True),
    ("missing extent file", _desc_case('RW 2048 FLAT "nowhere.vmdk" 0'), True),
    ("sparse extent not vmdk", _desc_case('RW 2048 SPARSE "d-flat.vmdk"'), True),
    (
        "no CID",
        lambda t: _descriptor(
            t, 'version=1\ncreateType="monolithicFlat"\nRW 2048 FLAT "d-flat.vmdk" 0\n'
        ),
        True,
    ),
    (
        "unterminated parent hint",
        _desc_case('RW 2048 FLAT "d-flat.vmdk" 0\nparentFileNameHint="x'),
        True,
    ),
    ("missing parent", lambda t: _orphan(t), True),
]


@pytest.mark.parametrize("what,build,ro", CASES, ids=[c[0] for c in CASES])
def test_refused_as_qsd(
    pair: Pair, tmp_path: Path, what: str, build: Callable[[Path], Path], ro: bool
) -> None:
    img = build(tmp_path)
    before = {p: hashlib.sha256(p.read_bytes()).digest() for p in tmp_path.iterdir()}
    got = pair.add(vmdk_node("x", img, **{"read-only": ro}))
    assert "error" in got["qsd"], f"{what}: QSD opens it"
    assert got["blockd"] == got["qsd"], what
    after = {p: hashlib.sha256(p.read_bytes()).digest() for p in tmp_path.iterdir()}
    assert after == before


def test_version_3_opens_read_only(pair: Pair, tmp_path: Path) -> None:
    img = _mutated(tmp_path, {"version": 3})
    pair.add_ok(vmdk_node("v3", img, **{"read-only": True}))
    pair.drop("v3", exported=False)


def test_l1_bound_exactly_32mi_entries_opens(pair: Pair, tmp_path: Path) -> None:
    """A 1 PiB disk whose grain directory has exactly 2^25 entries opens; its directory lies
    past the end of the small file. blockd reads only the pages it needs."""
    img = _mutated(tmp_path, {"capacity": (1 << 25) * GD_SPAN})
    assert img.stat().st_size < MiB
    pair.add_ok(vmdk_node("pib", img, **{"read-only": True}))
    for side in ("blockd", "qsd"):
        assert pair.named_node(side, "pib")["image"]["virtual-size"] == 1 << 50
    uris = pair.export("pib")
    for u in uris.values():
        qemu_io(
            "-r", "-f", "raw", "-c", "read -P 7 0 200k", "-c", f"read -P 0 {(1 << 50) - 4096} 4k", u
        )
    pair.drop("pib")


def test_streamoptimized_footer(pair: Pair, tmp_path: Path) -> None:
    """A streamOptimized image whose header points to its footer (as VMware's tools write
    them): the footer's header is used."""
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(range(256)) * 4096 * 4)
    img = tmp_path / "so.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, img)
    data = bytearray(img.read_bytes())
    data += bytes(-len(data) % 512)
    footer = bytearray(1536)
    struct.pack_into("<QII", footer, 0, 1, 0, 3)  # footer marker
    footer[512:516] = b"KDMV"
    footer[516 : 516 + 75] = data[4:79]
    struct.pack_into("<QII", footer, 1024, 0, 0, 0)  # end-of-stream marker
    set_field(data, "gd_offset", 2**64 - 1)
    img.write_bytes(bytes(data + footer))
    pair.add_ok(vmdk_node("so", img, **{"read-only": True}))
    uris = pair.export("so")
    for u in uris.values():
        res = qemu_img("compare", "-f", "raw", "-F", "raw", u, raw, check=False)
        assert res.returncode == 0, res.stdout
    pair.drop("so")
    # The same with a broken end-of-stream marker.
    img.write_bytes(bytes(data + footer[:1032] + b"\1" + footer[1033:]))
    got = pair.add(vmdk_node("so2", img, **{"read-only": True}))
    assert (
        got["blockd"]
        == got["qsd"]
        == {"error": {"class": "GenericError", "desc": "Invalid footer"}}
    )


def _norm(obj: object, tmp: Path) -> object:
    return json.loads(json.dumps(obj).replace(str(tmp), "$DIR"))


@pytest.mark.parametrize(
    "subformat", ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "streamOptimized"]
)
def test_named_block_nodes_as_qsd(pair: Pair, tmp_path: Path, subformat: str) -> None:
    img = tmp_path / "q.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", f"subformat={subformat}", img, str(3 * 1024 * MiB))
    pair.add_ok(vmdk_node("q", img, **{"read-only": True}))
    got = {}
    for side in ("blockd", "qsd"):
        got[side] = _norm(pair.named_node(side, "q"), tmp_path)
    assert got["blockd"] == got["qsd"]
    pair.drop("q", exported=False)


def test_probe(tmp_path: Path) -> None:
    """The probe (QEMU's vmdk_probe): both magics, and descriptors that start with
    comments, blank lines and a version line."""
    from blockd.block.drivers.vmdk.driver import VmdkDriver

    probe = VmdkDriver.probe
    assert probe(b"KDMV\1\0\0\0", "x") == 100
    assert probe(b"COWD\1\0\0\0", "x") == 100
    assert probe(b"# Disk DescriptorFile\n   \r\nversion=1\nCID=1\n", "x") == 100
    assert probe(b"#c\r\nversion=3\r\n", "x") == 100
    assert probe(b"version=4\n", "x") == 0
    assert probe(b" x\nversion=1\n", "x") == 0
    assert probe(b"QFI\xfb", "x") == 0
    created = _sparse(tmp_path, opts="subformat=monolithicFlat")
    assert probe(created.read_bytes()[:2048], str(created)) == 100


def test_descriptor_naming_itself(pair: Pair, tmp_path: Path) -> None:
    """A sparse file whose header points to an embedded descriptor that names the file
    itself: QEMU recurses until its stack overflows (qemu-img dies with SIGSEGV), so only
    blockd gets it; it refuses, cleanly, and keeps running."""
    img = _mutated(tmp_path, {"capacity": 0})
    data = bytearray(img.read_bytes())
    text = (
        b"# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n"
        b'createType="twoGbMaxExtentSparse"\nRW 2048 SPARSE "base.vmdk"\n\0'
    )
    data[512 : 512 + len(text)] = text
    img.write_bytes(bytes(data))
    res = pair.cmd("blockd", "blockdev-add", vmdk_node("loop", img, **{"read-only": True}))
    assert res["error"]["desc"].startswith("vmdk: descriptors nested deeper than 8 levels"), res
    nodes = pair.qmp["blockd"].run("query-named-block-nodes")["return"]
    assert not any(str(tmp_path) in n["file"] for n in nodes), nodes


def test_backing_option_as_qsd(pair: Pair, tmp_path: Path) -> None:
    """``backing: null`` and a backing node given by name: node info (a json: filename, as
    QEMU makes when the option overrides the recorded parent) and reads as QSD's. A parent
    that is not a vmdk has no CID: unallocated reads fail with EINVAL in both."""
    base = _sparse(tmp_path)
    top = tmp_path / "top.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", top)
    qemu_io("-f", "vmdk", "-c", "write -P 0x21 1M 64k", top)
    raw = {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": str(base)}}
    pair.add_ok(raw)
    for name, backing in (("nul", None), ("byname", "r")):
        pair.add_ok(vmdk_node(name, top, **{"read-only": True, "backing": backing}))
        got = {side: _norm(pair.named_node(side, name), tmp_path) for side in ("blockd", "qsd")}
        assert got["blockd"] == got["qsd"], name
        assert str(got["blockd"]["file"]).startswith("json:{")
        pair.export(name)
        for side in ("blockd", "qsd"):
            c = RawNbd(str(pair.nbd[side]))
            c.go(name, structured=False)
            assert c.read(MiB, 65536) == b"\x21" * 65536
            r = c.request(P.CMD_READ, 0, 4096)
            want = 0 if backing is None else errno.EINVAL
            assert r["error"] == want, (side, name, r["error"])
            c.disconnect()
        pair.drop(name)
    pair.drop("r", exported=False)
