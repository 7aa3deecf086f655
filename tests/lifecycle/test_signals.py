"""Signals end the daemon the way ``quit`` does: SIGHUP (a closed terminal) like SIGTERM, as
qemu-storage-daemon does; SIGPIPE never ends it; SIGUSR1 only
writes the stacks to the log."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from diffsupport import MiB, Session, qcow2_image, qcow2_node
from lifesupport import image_bitmaps
from support import start_blockd, start_qsd


@pytest.mark.parametrize("kind", ["qsd", "blockd"])
def test_sighup_exits_0_storing_bitmaps_and_removing_socket_and_pidfile(
    tmp_path: Path, kind: str
) -> None:
    img = qcow2_image(tmp_path / "a.qcow2", 16 * MiB)
    pid = tmp_path / f"{kind}.pid"
    start = start_blockd if kind == "blockd" else start_qsd
    d = start(tmp_path, "--pidfile", str(pid))
    s = Session(d.sock)
    s.ok("blockdev-add", qcow2_node("d", img))
    s.ok("block-dirty-bitmap-add", {"node": "d", "name": "b", "persistent": True})
    s.close()
    assert pid.exists()
    d.proc.send_signal(signal.SIGHUP)
    assert d.proc.wait(timeout=20) == 0, d.log_text()
    assert not d.sock.exists()
    assert not pid.exists()
    # Stored, and not left in use: the next incremental backup can rely on it.
    assert image_bitmaps(img) == [{"name": "b", "granularity": 65536, "flags": ["auto"]}]


def test_sigpipe_is_ignored(tmp_path: Path) -> None:
    d = start_blockd(tmp_path)
    try:
        d.proc.send_signal(signal.SIGPIPE)
        s = Session(d.sock)
        assert s.ok("query-version")["package"].startswith("blockd")
        s.close()
    finally:
        assert d.stop() == 0


def test_sigusr1_writes_the_stacks_and_changes_nothing(tmp_path: Path) -> None:
    """What a test that timed out asks a stuck daemon: where every thread is."""
    d = start_blockd(tmp_path)
    try:
        s = Session(d.sock)
        d.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert s.ok("query-version")["package"].startswith("blockd")
        s.close()
        log = d.log_text()
        assert "Current thread" in log or "Thread 0x" in log, log[-2000:]
        assert "blockd/cli.py" in log, log[-2000:]  # the thread, where the loop runs
        assert "Stack for <Task" in log and "serve" in log, log[-2000:]  # the tasks
    finally:
        assert d.stop() == 0
