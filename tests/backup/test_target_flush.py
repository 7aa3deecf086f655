"""A backup's target is flushed before the job completes (qemu-storage-daemon does not flush
it): what BLOCK_JOB_COMPLETED reports is on disk, and a target whose flush fails fails the
job instead of being reported complete."""

from __future__ import annotations

import shutil
from pathlib import Path

from diffsupport import (
    MiB,
    Session,
    blkdebug_raw_node,
    completed,
    qcow2_image,
    qcow2_node,
    raw_image,
    raw_node,
)
from support import qemu_img, start_blockd

WRITES = [(0x11, 0, 3 * MiB), (0x22, 5 * MiB, MiB), (0x33, 13 * MiB, 2 * MiB)]


def _backup(s: Session, target: str) -> dict[str, object]:
    s.ok("blockdev-backup", {"job-id": "j", "device": "src", "target": target, "sync": "full"})
    s.wait(lambda e: e["event"] == "BLOCK_JOB_COMPLETED")
    return completed(s, "j")


def test_target_copied_right_after_completion_holds_the_backup(tmp_path: Path) -> None:
    src = raw_image(tmp_path / "src.raw", 16 * MiB, WRITES)
    tgt = qcow2_image(tmp_path / "t.qcow2", 16 * MiB)
    d = start_blockd(tmp_path)
    try:
        s = Session(d.sock)
        s.ok("blockdev-add", raw_node("src", src))
        s.ok("blockdev-add", qcow2_node("tgt", tgt))
        assert "error" not in _backup(s, "tgt")
        # The target is still open in the daemon: copy it as a backup script would.
        copy = tmp_path / "copy.qcow2"
        shutil.copy(tgt, copy)
        assert (
            qemu_img("compare", "-f", "raw", "-F", "qcow2", src, copy, check=False).returncode == 0
        )
        s.close()
    finally:
        assert d.stop() == 0


def test_failing_target_flush_fails_the_job(tmp_path: Path) -> None:
    src = raw_image(tmp_path / "src.raw", 16 * MiB, WRITES)
    tgt = raw_image(tmp_path / "t.raw", 16 * MiB)
    d = start_blockd(tmp_path)
    try:
        s = Session(d.sock)
        s.ok("blockdev-add", raw_node("src", src))
        rules = [{"event": "none", "iotype": "flush", "errno": 5, "once": False}]
        s.ok("blockdev-add", blkdebug_raw_node("tgt", tgt, rules))
        assert _backup(s, "tgt")["error"] == "Input/output error"
        s.close()
    finally:
        assert d.stop() == 0
