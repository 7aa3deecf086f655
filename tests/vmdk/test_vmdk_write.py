"""Writes through blockd land where qemu-storage-daemon puts them: the same qemu-io script is
run over a writable NBD export of each daemon, each on its own copy of the image, and the
results must be the same files (apart from the new random CID), pass ``qemu-img check`` and
read back identically through qemu-img. streamOptimized is append-only, as in QEMU. Then a
vmdk as a backup target and as the backing file of a qcow2 overlay."""

from __future__ import annotations

import errno
import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from imagegen import build_vmdk3
from nbdtest import RawNbd
from support import check_image, qemu_img, qemu_io
from vmdktest import (
    SIDES,
    GiB,
    KiB,
    MiB,
    Pair,
    cid_of,
    descriptor_of,
    per_side,
    random_source,
    same_data,
    same_files,
    views,
    vmdk_node,
)

from blockd.nbd import protocol as P

SIZE = 2 * GiB + 8 * MiB


def _files_of(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix == ".vmdk")


def _script(rng: random.Random, src: Path, size: int) -> list[str]:
    """Random writes (most unaligned, some across grain and extent boundaries), rewrites of
    written ranges, and zero writes."""
    cmds: list[str] = []
    for i in range(24):
        n = rng.choice([1, 512, 3000, 4096, 65536, 65537, 200 * KiB, MiB])
        off = rng.randrange(0, size - n) if i % 5 else 2 * GiB - n // 2
        if i % 4 == 3:
            off -= off % 65536
            cmds.append(f"write -z {off} {rng.choice([65536, 3 * 65536, 100 * KiB])}")
        else:
            cmds.append(f"write -s {src} {off} {n}")
    cmds.append(f"write -s {src} {size - 1000} 1000")
    return cmds


@pytest.mark.parametrize(
    "subformat",
    [
        "monolithicSparse",
        "monolithicSparse+zeroed",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ],
)
def test_writes_as_qsd(pair: Pair, tmp_path: Path, subformat: str) -> None:
    rng = random.Random(subformat)
    src = random_source(tmp_path / "src.bin", rng)
    opts = f"subformat={subformat.split('+')[0]}"
    if subformat.endswith("+zeroed"):
        opts += ",zeroed_grain=on"
    script = _script(rng, src, SIZE)
    dirs = {side: tmp_path / side for side in SIDES}
    for d in dirs.values():
        d.mkdir()
        qemu_img("create", "-q", "-f", "vmdk", "-o", opts, d / "w.vmdk", str(SIZE))
    cid_before = cid_of(descriptor_of(dirs["blockd"] / "w.vmdk"))
    for side, d in dirs.items():
        assert "return" in pair.cmd(side, "blockdev-add", vmdk_node("w", d / "w.vmdk"))
    uris = pair.export("w", writable=True)
    for u in uris.values():
        qemu_io("-f", "raw", *[a for c in script for a in ("-c", c)], u)
    v = views(uris)
    assert v["blockd"] == v["qsd"]
    pair.drop("w")
    for a, b in zip(_files_of(dirs["blockd"]), _files_of(dirs["qsd"]), strict=True):
        assert a.name == b.name
        if a.stat().st_size > 64 * MiB:  # flat extents: the same bytes as qemu-img reads them
            qemu_img("compare", "-f", "raw", "-F", "raw", a, b)
        else:
            same_files(a, b)
    mine = dirs["blockd"] / "w.vmdk"
    assert check_image(mine)["rc"] == 0
    qemu_img("compare", "-f", "vmdk", "-F", "vmdk", mine, dirs["qsd"] / "w.vmdk")
    # The first write gave the image a new CID, as QEMU does.
    assert cid_of(descriptor_of(mine)) != cid_before


def test_stream_optimized_append_only(pair: Pair, tmp_path: Path) -> None:
    """Whole grains are appended compressed; a partial grain gets EINVAL, a grain written
    before EIO, as from QSD; the files end up the same."""
    size = 4 * MiB
    dirs = {side: tmp_path / side for side in SIDES}
    for side, d in dirs.items():
        d.mkdir()
        qemu_img(
            "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", d / "s.vmdk", str(size)
        )
        assert "return" in pair.cmd(side, "blockdev-add", vmdk_node("s", d / "s.vmdk"))
    pair.export("s", writable=True)
    rng = random.Random(3)
    data = rng.randbytes(64 * KiB) + bytes(64 * KiB) + b"vmdk" * (16 * KiB)
    writes = [
        (0, data[: 64 * KiB], 0),
        (64 * KiB, data[: 4 * KiB], errno.EINVAL),  # a partial grain
        (192 * KiB, data, 0),  # three grains
        (0, data[: 64 * KiB], errno.EIO),  # written already
        (size - 64 * KiB, data[64 * KiB : 128 * KiB], 0),  # the last grain, zeroes
    ]
    for side in SIDES:
        c = RawNbd(str(pair.nbd[side]))
        c.go("s", structured=False)
        for off, buf, want in writes:
            r = c.request(P.CMD_WRITE, off, len(buf), payload=buf)
            assert r["error"] == want, (side, off, r)
        c.disconnect()
    pair.drop("s")
    same_files(dirs["blockd"] / "s.vmdk", dirs["qsd"] / "s.vmdk")
    assert check_image(dirs["blockd"] / "s.vmdk")["rc"] == 0
    qemu_io("-f", "vmdk", "-c", "read -P 0 64k 128k", dirs["blockd"] / "s.vmdk")


def _sha(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def _raw_source(
    path: Path, size: int, offsets: tuple[int, ...], length: int, rng: random.Random
) -> Path:
    """A sparse raw image of *size* with *length* random bytes at each offset."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in offsets:
            f.seek(off)
            f.write(rng.randbytes(length))
    return path


def _raw_node(name: str, path: Path) -> dict[str, Any]:
    return {"driver": "raw", "node-name": name, "file": {"driver": "file", "filename": str(path)}}


def _copy_into_vmdk_targets(
    pair: Pair,
    tmp_path: Path,
    source: tuple[random.Random, tuple[int, ...], int],
    targets: tuple[tuple[str, str, dict[str, Any]], ...],
    job: Callable[[Any, str, dict[str, Any]], None],
) -> None:
    """On both daemons: a sparse raw source with *source* = (rng, offsets, length) random
    data, then for each (node name, subformat, job arguments) target a fresh vmdk that *job*
    fills from node ``src``; each target then passes ``qemu-img check`` and compares equal
    to the source."""
    rng, offsets, length = source
    size = 24 * MiB
    for side in SIDES:
        d = tmp_path / side
        d.mkdir()
        src = _raw_source(d / "src.raw", size, offsets, length, rng)
        q = pair.qmp[side]
        q.run("blockdev-add", _raw_node("src", src))
        for name, sub, extra in targets:
            tgt = d / f"{name}.vmdk"
            qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={sub}", tgt, str(size))
            q.run("blockdev-add", vmdk_node(name, tgt))
            job(q, name, extra)
            ev = q.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
            assert "error" not in ev["data"], (side, ev)
            q.run("blockdev-del", {"node-name": name})
            assert check_image(tgt)["rc"] == 0
            qemu_img("compare", "-f", "raw", "-F", "vmdk", src, tgt)
        q.run("blockdev-del", {"node-name": "src"})


def test_backup_target(pair: Pair, tmp_path: Path) -> None:
    """blockdev-backup into vmdk targets (monolithicSparse; streamOptimized with compress)."""

    def backup(q: Any, name: str, extra: dict[str, Any]) -> None:
        q.run(
            "blockdev-backup",
            {"job-id": name, "device": "src", "target": name, "sync": "full", **extra},
        )

    _copy_into_vmdk_targets(
        pair,
        tmp_path,
        (random.Random(4), (0, 5 * MiB + 4096, 20 * MiB), MiB + 333),
        (("t1", "monolithicSparse", {}), ("t2", "streamOptimized", {"compress": True})),
        backup,
    )


def test_mirror_target(pair: Pair, tmp_path: Path) -> None:
    """blockdev-mirror into vmdk targets, completed after READY."""

    def mirror(q: Any, name: str, extra: dict[str, Any]) -> None:
        q.run("blockdev-mirror", {"job-id": name, "device": "src", "target": name, "sync": "full"})
        q.wait_event("BLOCK_JOB_READY", timeout=60)
        q.run("block-job-complete", {"device": name})

    _copy_into_vmdk_targets(
        pair,
        tmp_path,
        (random.Random(5), (0, 3 * MiB + 512, 12 * MiB), MiB + 777),
        (("m1", "monolithicSparse", {}), ("m2", "monolithicFlat", {})),
        mirror,
    )


def test_backing_of_qcow2_overlay(pair: Pair, tmp_path: Path) -> None:
    """A qcow2 overlay over a vmdk: with the format given, and probed (no -F)."""
    rng = random.Random(8)
    src = random_source(tmp_path / "src.bin", rng)
    base = tmp_path / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", base, "32M")
    qemu_io("-f", "vmdk", "-c", f"write -s {src} 1M 2M", "-c", f"write -s {src} 30M 1M", base)
    base_files = {p: _sha(p) for p in _files_of(tmp_path)}
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "vmdk", top)
    qemu_io("-f", "qcow2", "-c", "write -P 0x66 2M 64k", top)
    # The overlay names its vmdk backing file without a format: the format is probed (the
    # backing format extension is turned into the end of the extensions).
    top2 = tmp_path / "top2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "vmdk", top2)
    data = bytearray(top2.read_bytes())
    at = data.index(bytes.fromhex("e2792aca"))
    data[at : at + 4] = bytes(4)
    top2.write_bytes(bytes(data))
    for name, img in (("top", top), ("top2", top2)):
        spec = {
            "driver": "qcow2",
            "node-name": name,
            "read-only": True,
            "file": {"driver": "file", "filename": str(img)},
        }
        pair.add_ok(spec)
        uris = pair.export(name)
        same_data(uris["blockd"], img, "qcow2")
        v = views(uris)
        assert v["blockd"] == v["qsd"]
        for side in SIDES:
            node = pair.named_node(side, name, flat=False)
            assert node["image"]["backing-image"]["format"] == "vmdk"
        pair.drop(name)
    # Writes through blockd into the overlay leave the vmdk as it was.
    assert "return" in pair.cmd(
        "blockd",
        "blockdev-add",
        {"driver": "qcow2", "node-name": "w", "file": {"driver": "file", "filename": str(top)}},
    )
    pair.qmp["blockd"].run(
        "block-export-add", {"type": "nbd", "id": "w", "node-name": "w", "writable": True}
    )
    qemu_io("-f", "raw", "-c", "write -P 0x77 1M 4M", f"nbd+unix:///w?socket={pair.nbd['blockd']}")
    pair.qmp["blockd"].run("block-export-del", {"id": "w"})
    pair.qmp["blockd"].wait_event("BLOCK_EXPORT_DELETED")
    pair.qmp["blockd"].run("blockdev-del", {"node-name": "w"})
    assert {p: _sha(p) for p in _files_of(tmp_path)} == base_files
    qemu_io("-f", "qcow2", "-c", "read -P 0x77 1M 4M", top)


def test_vmfs_sparse_writes_as_qsd(pair: Pair, tmp_path: Path) -> None:
    """QEMU writes vmfsSparse (COWD) extents too: 32-bit tables of 4096 entries, 4 KiB grains
    here; the files end up the same as QSD's."""
    rng = random.Random(13)
    grains = {g: rng.randbytes(4096) for g in rng.sample(range(512), 20)}
    desc, _want = build_vmdk3(tmp_path, "cw", 2 * MiB, grains)
    dirs = per_side(tmp_path, desc, tmp_path / "cw-cowd.vmdk")
    for side, d in dirs.items():
        assert "return" in pair.cmd(side, "blockdev-add", vmdk_node("cw", d / "cw.vmdk"))
    uris = pair.export("cw", writable=True)
    src = random_source(tmp_path / "src.bin", rng)
    script = [f"write -s {src} {rng.randrange(0, 2 * MiB - 9000)} 9000" for _ in range(12)]
    for u in uris.values():
        qemu_io("-f", "raw", *[a for c in script for a in ("-c", c)], u)
    pair.drop("cw")
    same_files(dirs["blockd"] / "cw-cowd.vmdk", dirs["qsd"] / "cw-cowd.vmdk")
    same_files(dirs["blockd"] / "cw.vmdk", dirs["qsd"] / "cw.vmdk")
