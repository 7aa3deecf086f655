"""Process lifecycle: socket permissions, signals, a second daemon, stale sockets."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from support import ROOT, start_blockd


def test_socket_is_private(blockd: Any) -> None:
    assert stat.S_IMODE(os.stat(blockd.sock).st_mode) == 0o600


def test_sigterm_exits_zero_and_removes_socket(blockd: Any) -> None:
    blockd.proc.send_signal(signal.SIGTERM)
    assert blockd.proc.wait(timeout=20) == 0
    assert not blockd.sock.exists()


def test_sigint_exits_zero(blockd: Any) -> None:
    blockd.proc.send_signal(signal.SIGINT)
    assert blockd.proc.wait(timeout=20) == 0
    assert not blockd.sock.exists()


def test_second_daemon_on_live_socket_exits_1(blockd: Any) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "blockd", "--socket", str(blockd.sock)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [f"blockd: {blockd.sock} is in use by a running daemon"]
    # The first daemon is untouched and still answers.
    assert blockd.proc.poll() is None
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(blockd.sock))
    assert b'"QMP"' in s.recv(4096)
    s.close()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "blockd.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # a socket file nobody listens on, as after kill -9
    d = start_blockd(tmp_path)
    try:
        assert d.sock == path
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(path))
        assert b'"QMP"' in c.recv(4096)
        c.close()
    finally:
        assert d.stop() == 0


def test_pidfile(tmp_path: Path) -> None:
    pid = tmp_path / "blockd.pid"
    d = start_blockd(tmp_path, "--pidfile", str(pid))
    try:
        assert int(pid.read_text()) == d.proc.pid
    finally:
        assert d.stop() == 0
    assert not pid.exists()
