"""At the default log level a job says what it does: one line when it starts and one when it
ends, with source, target, sync mode, bitmap, bytes, time and rate, and for a failure the
error and where it happened. Raw events stay out of it (they are for QMP clients)."""

from __future__ import annotations

import re
from pathlib import Path

from diffsupport import (
    MiB,
    Session,
    blkdebug_raw_node,
    qcow2_image,
    qcow2_node,
    raw_image,
    raw_node,
)
from support import start_blockd

WRITES = [(0x11, 0, 3 * MiB), (0x22, 9 * MiB, MiB)]
TIME_RATE = r"in \d+\.\d\d s \(\d+(\.\d)? (bytes|KiB|MiB|GiB|TiB)/s\)"


def _job_lines(log: str) -> list[str]:
    return [ln.split(" blockd.job: ", 1)[1] for ln in log.splitlines() if " blockd.job: " in ln]


def test_backup_start_and_end_lines(tmp_path: Path) -> None:
    src = raw_image(tmp_path / "src.raw", 16 * MiB, WRITES)
    full = qcow2_image(tmp_path / "full.qcow2", 16 * MiB)
    inc = qcow2_image(tmp_path / "inc.qcow2", 16 * MiB)
    d = start_blockd(tmp_path, "--log-level", "info")
    try:
        s = Session(d.sock)
        s.ok("blockdev-add", raw_node("src", src))
        s.ok("blockdev-add", qcow2_node("full", full))
        s.ok("blockdev-add", qcow2_node("inc", inc))
        s.ok(
            "transaction",
            {
                "actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b"}},
                    {
                        "type": "blockdev-backup",
                        "data": {"job-id": "j0", "device": "src", "target": "full", "sync": "full"},
                    },
                ]
            },
        )
        s.wait(lambda e: e["event"] == "BLOCK_JOB_COMPLETED")
        s.ok(
            "blockdev-backup",
            {
                "job-id": "j1",
                "device": "src",
                "target": "inc",
                "sync": "bitmap",
                "bitmap": "b",
                "bitmap-mode": "on-success",
            },
        )
        s.wait(lambda e: e["event"] == "BLOCK_JOB_COMPLETED" and e["data"]["device"] == "j1")
        s.close()
    finally:
        assert d.stop() == 0
    lines = _job_lines(d.log_text())
    full_what = "src -> full, sync=full, 16.0 MiB to copy"
    inc_what = "src -> inc, sync=bitmap, bitmap=b (on-success), 0 bytes to copy"
    assert lines[0] == f"job j0: backup started: {full_what}", lines
    assert re.fullmatch(
        f"job j0: backup completed, 16.0 MiB {TIME_RATE}: {re.escape(full_what)}", lines[1]
    )
    assert lines[2] == f"job j1: backup started: {inc_what}", lines
    assert re.fullmatch(
        f"job j1: backup completed, 0 bytes {TIME_RATE}: {re.escape(inc_what)}", lines[3]
    )
    assert len(lines) == 4, lines
    assert " event " not in d.log_text()


def test_failed_backup_says_why_and_where(tmp_path: Path) -> None:
    src = raw_image(tmp_path / "src.raw", 16 * MiB, WRITES)
    tgt = raw_image(tmp_path / "t.raw", 16 * MiB)
    d = start_blockd(tmp_path, "--log-level", "info")
    try:
        s = Session(d.sock)
        s.ok("blockdev-add", raw_node("src", src))
        rules = [{"event": "none", "iotype": "write", "errno": 28, "once": False}]
        s.ok("blockdev-add", blkdebug_raw_node("tgt", tgt, rules))
        s.ok("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"})
        s.wait(lambda e: e["event"] == "BLOCK_JOB_COMPLETED")
        s.close()
    finally:
        assert d.stop() == 0
    start, end = _job_lines(d.log_text())
    what = "src -> tgt, sync=full, 16.0 MiB to copy"
    assert start == f"job j: backup started: {what}"
    assert re.fullmatch(
        f"job j: backup failed after [^:]* {TIME_RATE}: {what}: "
        r"No space left on device \(writing target 'tgt'\)",
        end,
    ), end


def test_create_job_lines(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    d = start_blockd(tmp_path, "--log-level", "info")
    try:
        s = Session(d.sock)
        opts = {"driver": "file", "filename": str(img), "size": 64 * MiB}
        s.ok("blockdev-create", {"job-id": "c0", "options": opts})
        s.wait_job("c0", "concluded")
        s.ok("job-dismiss", {"id": "c0"})
        s.close()
    finally:
        assert d.stop() == 0
    start, end = _job_lines(d.log_text())
    what = f"driver=file, filename='{img}', size=64.0 MiB"
    assert start == f"job c0: create started: {what}"
    assert re.fullmatch(rf"job c0: create completed, in \d+\.\d\d s: {re.escape(what)}", end), end
