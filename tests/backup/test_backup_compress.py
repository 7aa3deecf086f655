"""blockdev-backup / drive-backup with ``compress: true`` (issue 5): the target's data clusters
are stored compressed, zero ranges stay zero clusters or holes, and the target matches what
qemu-storage-daemon 7.2 makes of the same source: same events and errors, same contents, the
same number of compressed and allocated clusters, and ``qemu-img check`` clean on both.

qemu-img 7.2's map has no ``compressed`` member, so compressed clusters are counted with
``qemu-img check --output=json`` (``compressed-clusters``)."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from diffsupport import (
    MiB,
    Session,
    compare,
    completed,
    nbd_write,
    qcow2_node,
    raw_image,
    raw_node,
    run_both,
)
from support import check_image, qemu_img, qemu_io, start_blockd

SIZE = 8 * MiB


def _source(path: Path, seed: int = 7) -> None:
    """Incompressible data, repeated patterns, allocated zeroes and holes."""
    raw_image(path, SIZE, [(0x5A, 2 * MiB, MiB), (0x11, 5 * MiB + 4096, 8192)])
    with open(path, "r+b") as f:
        f.write(random.Random(seed).randbytes(MiB))
        f.seek(4 * MiB)
        f.write(bytes(MiB))  # data that happens to be zero: compressed, not skipped
        f.seek(6 * MiB)
        f.write((b"blockd" * MiB)[:MiB])


def _qcow2(path: Path, compat: str, cluster: int, size: int = SIZE) -> None:
    qemu_img(
        "create", "-f", "qcow2", "-o", f"compat={compat},cluster_size={cluster}", path, str(size)
    )


def _check(path: Path) -> dict[str, Any]:
    out = check_image(path)
    assert out["rc"] == 0, out
    assert not out.get("leaks") and not out.get("corruptions"), out
    return out


@pytest.mark.parametrize(
    ("compat", "cluster"),
    [("1.1", 65536), ("0.10", 65536), ("1.1", 512), ("0.10", 4096), ("1.1", 2 * MiB)],
)
def test_backup_compress_like_qsd(tmp_path: Path, compat: str, cluster: int) -> None:
    def build(d: Path) -> None:
        _source(d / "src.raw")
        raw_image(d / "tgt.raw", SIZE)
        _qcow2(d / "tgt.qcow2", compat, cluster)

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        s.ok("blockdev-add", raw_node("src", d / "src.raw"))
        s.ok("blockdev-add", raw_node("raw", d / "tgt.raw"))
        s.ok("blockdev-add", qcow2_node("q", d / "tgt.qcow2"))
        errors = [
            s.err(
                "blockdev-backup",
                {"job-id": "r", "device": "src", "target": "raw", "sync": "full", "compress": True},
            ),
            s.err(
                "drive-backup",
                {
                    "job-id": "r",
                    "device": "src",
                    "target": str(d / "tgt.raw"),
                    "format": "raw",
                    "mode": "existing",
                    "sync": "full",
                    "compress": True,
                },
            ),
        ]
        s.ok(
            "blockdev-backup",
            {"job-id": "j", "device": "src", "target": "q", "sync": "full", "compress": True},
        )
        s.wait_job("j", "null")
        # A second compressed backup meets clusters that are allocated now: QEMU 7.2 cannot
        # put compressed data there and fails with EIO.
        s.ok(
            "blockdev-backup",
            {"job-id": "k", "device": "src", "target": "q", "sync": "full", "compress": True},
        )
        s.wait_job("k", "null")
        return {
            "errors": errors,
            "done": completed(s, "j"),
            "again": completed(s, "k").get("error"),
            "events": [n for n in s.names() if not n.startswith("J:k:")],
        }

    res = run_both(tmp_path, build, scenario)
    b, q = res["blockd"], res["qsd"]
    assert b["errors"] == q["errors"] == ["Compression is not supported for this drive "] * 2
    assert b["done"] == q["done"]
    assert b["again"] == q["again"] == "Input/output error"
    assert b["events"] == q["events"]

    checks = {}
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        checks[kind] = _check(d / "tgt.qcow2")
        assert compare(d / "src.raw", d / "tgt.qcow2", "raw", "qcow2"), kind
    assert checks["blockd"]["compressed-clusters"] > 0
    for key in ("compressed-clusters", "allocated-clusters", "total-clusters"):
        assert checks["blockd"][key] == checks["qsd"][key], key
    assert compare(
        tmp_path / "blockd" / "tgt.qcow2", tmp_path / "qsd" / "tgt.qcow2", "qcow2", "qcow2"
    )


@pytest.mark.parametrize(("compat", "cluster"), [("1.1", 65536), ("0.10", 4096)])
def test_normal_writes_over_compressed_target(tmp_path: Path, compat: str, cluster: int) -> None:
    """After a compressed backup, writes through an NBD export of the target (unaligned,
    partial clusters: copy-on-write out of compressed clusters) and a normal backup onto a
    part of it keep the image clean and right."""
    src, ref, tgt = tmp_path / "src.raw", tmp_path / "ref.raw", tmp_path / "tgt.qcow2"
    src2 = tmp_path / "src2.raw"
    _source(src)
    _qcow2(tgt, compat, cluster)
    raw_image(src2, SIZE, [(0x77, 0, SIZE)])
    daemon = start_blockd(tmp_path)
    s = Session(daemon.sock)
    nbd_sock = tmp_path / "nbd.sock"
    rng = random.Random(cluster)
    writes = []
    for _ in range(12):
        off = rng.randrange(0, SIZE - 200_000)
        writes.append((rng.randrange(1, 255), off, rng.choice([1, 512, 4096, 70_000, 200_000])))
    try:
        s.ok("blockdev-add", raw_node("src", src))
        s.ok("blockdev-add", qcow2_node("q", tgt))
        s.ok(
            "blockdev-backup",
            {"job-id": "j", "device": "src", "target": "q", "sync": "full", "compress": True},
        )
        s.wait_job("j", "null")
        assert "error" not in completed(s, "j")
        s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}})
        s.ok("block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "writable": True})
        for pattern, off, n in writes:
            nbd_write(nbd_sock, "q", pattern, off, n)
        s.ok("block-export-del", {"id": "e"})
        s.ok("nbd-server-stop")
        s.wait(lambda e: e["event"] == "BLOCK_EXPORT_DELETED")
    finally:
        s.close()
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
    _check(tgt)
    shutil.copy(src, ref)
    cmds: list[str] = []
    for pattern, off, n in writes:
        cmds += ["-c", f"write -P {pattern} {off} {n}"]
    qemu_io("-f", "raw", *cmds, ref)
    assert compare(ref, tgt, "raw", "qcow2")
    ref.unlink()
    src2.unlink()


def test_compressed_backup_is_point_in_time(tmp_path: Path) -> None:
    """Guest writes during a throttled compressed backup: copy-before-write sends the old
    clusters compressed too, and the target is the source as it was at the start."""
    daemon = start_blockd(tmp_path)
    s = Session(daemon.sock)
    nbd_sock = tmp_path / "nbd.sock"
    try:
        s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}})
        for seed in range(3):
            rng = random.Random(seed)
            src, snap, tgt = (tmp_path / f"{n}{seed}" for n in ("src.raw", "snap.raw", "t.qcow2"))
            _source(src, seed)
            shutil.copy(src, snap)
            _qcow2(tgt, "1.1", 65536)
            s.ok("blockdev-add", raw_node("src", src))
            s.ok("blockdev-add", qcow2_node("q", tgt))
            s.ok(
                "block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True}
            )
            s.ok(
                "blockdev-backup",
                {
                    "job-id": "j",
                    "device": "src",
                    "target": "q",
                    "sync": "full",
                    "compress": True,
                    "speed": 2 * MiB,
                },
            )
            cmds: list[str] = []
            for _ in range(8):
                off = rng.randrange(0, SIZE - 300_000)
                cmds += ["-c", f"write -P {rng.randrange(1, 255)} {off} {rng.randint(1, 300_000)}"]
                cmds += ["-c", f"sleep {rng.randint(0, 20)}"]
            res = subprocess.run(
                ["qemu-io", "-f", "raw", *cmds, f"nbd+unix:///src?socket={nbd_sock}"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert res.returncode == 0 and "error" not in res.stdout.lower(), res.stdout
            s.ok("block-job-set-speed", {"device": "j", "speed": 0})
            s.wait_job("j", "null")
            assert "error" not in completed(s, "j")
            s.ok("block-export-del", {"id": "e"})
            s.wait(lambda e: e["event"] == "BLOCK_EXPORT_DELETED")
            s.events.clear()
            s.ok("blockdev-del", {"node-name": "q"})
            s.ok("blockdev-del", {"node-name": "src"})
            assert _check(tgt)["compressed-clusters"] > 0
            assert compare(snap, tgt, "raw", "qcow2"), f"seed {seed}"
            for p in (src, snap, tgt):
                p.unlink()
    finally:
        s.close()
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
