"""Signals end the daemon the way ``quit`` does: SIGHUP (a closed terminal) like SIGTERM, as
qemu-storage-daemon does; SIGPIPE never ends it."""

from __future__ import annotations

import signal
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
