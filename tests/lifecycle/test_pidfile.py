"""``--pidfile``: locked like qemu-storage-daemon's (each refuses the other's), never written
through a symlink, private, and removed only by the daemon that owns it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from lifesupport import lines, qsd_monitor_args, run_blockd, run_qsd
from support import start_blockd, start_qsd

LOCKED = "cannot create PID file: Cannot lock pid file: Resource temporarily unavailable"


@pytest.mark.parametrize("first", ["qsd", "blockd"])
def test_locked_pidfile_is_refused_like_qsd(tmp_path: Path, first: str) -> None:
    pid = tmp_path / "d.pid"
    start = start_blockd if first == "blockd" else start_qsd
    d = start(tmp_path, "--pidfile", str(pid), name="first")
    try:
        want = f"{d.proc.pid}\n"
        assert pid.read_text() == want
        b = run_blockd("--socket", tmp_path / "second.sock", "--pidfile", pid)
        q = run_qsd(*qsd_monitor_args(tmp_path / "q.sock"), "--pidfile", pid)
        assert (b.returncode, lines(b.stderr)) == (1, [f"blockd: {LOCKED}"])
        assert (q.returncode, lines(q.stderr)) == (1, [f"qemu-storage-daemon: {LOCKED}"])
        # The running daemon's pid file is untouched, and the refused one left no socket.
        assert pid.read_text() == want
        assert not (tmp_path / "second.sock").exists()
    finally:
        assert d.stop() == 0
    assert not pid.exists()


def test_second_daemon_on_busy_socket_leaves_first_pidfile_alone(tmp_path: Path) -> None:
    pid = tmp_path / "d.pid"
    d = start_blockd(tmp_path, "--pidfile", str(pid))
    try:
        want = pid.read_text()
        res = run_blockd("--socket", d.sock, "--pidfile", pid)
        assert res.returncode == 1
        assert pid.read_text() == want
        other = tmp_path / "other.pid"
        res = run_blockd("--socket", d.sock, "--pidfile", other)
        assert lines(res.stderr) == [f"blockd: {d.sock} is in use by a running daemon"]
        assert not other.exists()  # its own file, taken and given back
        assert pid.read_text() == want
    finally:
        assert d.stop() == 0


def test_symlink_at_pidfile_path_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "d.pid"
    link.symlink_to(victim)
    res = run_blockd("--socket", tmp_path / "b.sock", "--pidfile", link)
    assert res.returncode == 1
    assert lines(res.stderr) == [
        f"blockd: cannot create PID file: Could not create '{link}': "
        "Too many levels of symbolic links"
    ]
    assert victim.read_text() == "precious\n"
    assert link.is_symlink()
    assert not (tmp_path / "b.sock").exists()


def test_pidfile_is_private_and_a_stale_one_is_taken_over(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.pid"
    stale = tmp_path / "stale.pid"
    stale.write_text("999999\nleft over by a killed daemon\n")
    stale.chmod(0o644)
    for pid in (fresh, stale):
        d = start_blockd(tmp_path, "--pidfile", str(pid))
        try:
            assert stat.S_IMODE(os.stat(pid).st_mode) == 0o600
            assert pid.read_text() == f"{d.proc.pid}\n"
        finally:
            assert d.stop() == 0
        assert not pid.exists()


def test_pidfile_replaced_by_someone_else_is_not_removed(tmp_path: Path) -> None:
    pid = tmp_path / "d.pid"
    d = start_blockd(tmp_path, "--pidfile", str(pid))
    try:
        pid.unlink()
        pid.write_text("not blockd's\n")
    finally:
        assert d.stop() == 0
    assert pid.read_text() == "not blockd's\n"


def test_missing_directory_and_directory_at_path_match_qsd(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    for path in (tmp_path / "missing" / "d.pid", tmp_path / "adir"):
        b = run_blockd("--socket", tmp_path / "b.sock", "--pidfile", path)
        q = run_qsd(*qsd_monitor_args(tmp_path / "q.sock"), "--pidfile", path)
        assert b.returncode == q.returncode == 1
        assert [ln.removeprefix("blockd: ") for ln in lines(b.stderr)] == [
            ln.removeprefix("qemu-storage-daemon: ") for ln in lines(q.stderr)
        ]
