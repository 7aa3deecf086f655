"""Copy-before-write errors: a sequential writer's copy reaches ahead of the write (up to
1 MiB) to save work; when the target fails *there*, outside the clusters the write touches,
that write must still succeed (its own clusters are copied again on their own), the failed
clusters stay dirty and are copied later, and the backup is still the image as of its start.
A failure inside the write's own clusters fails the write."""

from __future__ import annotations

import shutil
from pathlib import Path

from diffsupport import MiB, Session, blkdebug_raw_node, compare, raw_image, raw_node
from support import qemu_io, start_blockd

SIZE = 8 * MiB


def _setup(tmp_path: Path, rules: list[dict[str, object]]) -> tuple[Session, object, Path, Path]:
    src = raw_image(tmp_path / "src.raw", SIZE, [(0x11, 0, SIZE)])
    tgt = raw_image(tmp_path / "tgt.raw", SIZE)
    snap = tmp_path / "snap.raw"
    shutil.copy(src, snap)
    daemon = start_blockd(tmp_path)
    s = Session(daemon.sock)
    s.ok("blockdev-add", raw_node("src", src))
    s.ok("blockdev-add", blkdebug_raw_node("tgt", tgt, rules))
    sock = tmp_path / "nbd.sock"
    s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    s.ok("block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True})
    # Barely moving, so every guest write below meets clusters not yet copied.
    s.ok(
        "blockdev-backup",
        {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": 1},
    )
    return s, daemon, sock, snap


def _write(sock: Path, off: int, n: int, pattern: int = 0x22) -> str:
    res = qemu_io(
        "-f",
        "raw",
        "-c",
        f"write -P {pattern} {off} {n}",
        f"nbd+unix:///src?socket={sock}",
        check=False,
    )
    return res.stdout + res.stderr


def test_failure_ahead_of_a_sequential_write_does_not_fail_it(tmp_path: Path) -> None:
    # 4 MiB + 512 KiB: inside what the second write's copy reaches ahead to, outside it.
    bad = 4 * MiB + 512 * 1024
    s, daemon, sock, snap = _setup(
        tmp_path,
        [
            {
                "event": "write_aio",
                "iotype": "write",
                "errno": 5,
                "sector": bad // 512,
                "once": True,
            },
        ],
    )
    try:
        assert "error" not in _write(sock, 4 * MiB - 64 * 1024, 64 * 1024).lower()
        out = _write(sock, 4 * MiB, 64 * 1024)  # sequential: its copy reaches ahead
        assert "error" not in out.lower() and "failed" not in out.lower(), out
        # The failed range is copied again (the rule fired once) before this write lands.
        assert "error" not in _write(sock, bad, 4096, 0x33).lower()
        s.ok("block-job-set-speed", {"device": "j", "speed": 0})
        s.wait_job("j", "concluded")
        done = [e for e in s.events if e["event"] == "BLOCK_JOB_COMPLETED"]
        assert done and "error" not in done[0]["data"], done
    finally:
        s.close()
        daemon.stop()
    assert compare(snap, tmp_path / "tgt.raw"), "target is not the image as of the job start"


def test_failure_in_the_writes_own_clusters_fails_it(tmp_path: Path) -> None:
    own = 2 * MiB
    s, daemon, sock, snap = _setup(
        tmp_path,
        [
            {
                "event": "write_aio",
                "iotype": "write",
                "errno": 5,
                "sector": own // 512,
                "once": True,
            },
        ],
    )
    try:
        out = _write(sock, own, 64 * 1024)
        assert "error" in out.lower() or "failed" in out.lower(), out
        s.ok("block-job-set-speed", {"device": "j", "speed": 0})
        s.wait_job("j", "concluded")
    finally:
        s.close()
        daemon.stop()
    # The failed guest write changed nothing, so the target still matches the start.
    assert compare(snap, tmp_path / "tgt.raw")
