"""A backup's target is flushed before the job completes (qemu-storage-daemon does not flush
it): what BLOCK_JOB_COMPLETED reports is on disk, and a target whose flush fails fails the
job instead of being reported complete."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def _backed_up(tmp: Path, target: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A full backup of a 16 MiB source to the node *target* (named tgt), done; yields the
    BLOCK_JOB_COMPLETED data while the daemon still runs."""
    d = start_blockd(tmp)
    try:
        s = Session(d.sock)
        s.ok("blockdev-add", raw_node("src", tmp / "src.raw"))
        s.ok("blockdev-add", target)
        s.ok("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"})
        s.wait(lambda e: e["event"] == "BLOCK_JOB_COMPLETED")
        yield completed(s, "j")
        s.close()
    finally:
        assert d.stop() == 0


def test_target_copied_right_after_completion_holds_the_backup(tmp_path: Path) -> None:
    src = raw_image(tmp_path / "src.raw", 16 * MiB, WRITES)
    tgt = qcow2_image(tmp_path / "t.qcow2", 16 * MiB)
    with _backed_up(tmp_path, qcow2_node("tgt", tgt)) as done:
        assert "error" not in done
        # The target is still open in the daemon: copy it as a backup script would.
        copy = tmp_path / "copy.qcow2"
        shutil.copy(tgt, copy)
    res = qemu_img("compare", "-f", "raw", "-F", "qcow2", src, copy, check=False)
    assert res.returncode == 0, res.stdout


def test_failing_target_flush_fails_the_job(tmp_path: Path) -> None:
    raw_image(tmp_path / "src.raw", 16 * MiB, WRITES)
    tgt = raw_image(tmp_path / "t.raw", 16 * MiB)
    rules = [{"event": "none", "iotype": "flush", "errno": 5, "once": False}]
    with _backed_up(tmp_path, blkdebug_raw_node("tgt", tgt, rules)) as done:
        assert done["error"] == "Input/output error"
