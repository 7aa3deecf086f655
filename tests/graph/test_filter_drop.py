"""A backup ending while a write is inside its copy-before-write filter (found by the stress
run: a write through the filter at the moment a backup was cancelled).

The write must finish, on the source, with its old data copied or not needed any more; the
filter may only go once nothing is inside it. Before, the filter was removed under the write,
which then failed with ``KeyError: 'file'`` (an NBD "internal error"), and its copy kept
writing a target the user was already deleting.

The target is an ``nbd`` node behind a proxy the test can pause, so the copy to the target
stalls exactly when the test wants.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffsupport import qcow2_image
from rawclient import RawQmp
from stallproxy import StallProxy
from support import Daemon, qemu_img, qemu_io


def _unix(path: Path) -> dict[str, Any]:
    return {"type": "unix", "data": {"path": str(path)}}


def _events_until(c: RawQmp, name: str, job: str) -> list[dict[str, Any]]:
    seen = []
    while True:
        m = c.recv()
        if "event" not in m:
            continue
        seen.append(m)
        if m["event"] == name and m["data"].get("device") == job:
            return seen


def test_write_inside_the_filter_when_the_backup_is_cancelled(
    tmp_path: Path,
    blockd: Daemon,
    qsd_factory: Callable[..., Daemon],
) -> None:
    src, tgt = tmp_path / "s.qcow2", tmp_path / "t.raw"
    qcow2_image(src, 4 << 20, [(1, 0, 1 << 20)])
    qemu_img("create", "-q", "-f", "raw", tgt, "4M")
    # The backup target is served by qemu-storage-daemon, through the proxy.
    qsd = qsd_factory()
    q = RawQmp(qsd.sock, timeout=30)
    q.negotiate()
    assert "return" in q.cmd("nbd-server-start", {"addr": _unix(tmp_path / "qsd-nbd.sock")})
    q.cmd("blockdev-add", {"driver": "file", "node-name": "t", "filename": str(tgt)})
    q.cmd("block-export-add", {"type": "nbd", "id": "t", "node-name": "t", "writable": True})
    proxy = StallProxy(tmp_path / "proxy.sock", tmp_path / "qsd-nbd.sock")

    a = RawQmp(blockd.sock, timeout=60)
    a.negotiate()
    file = {"driver": "file", "filename": str(src)}
    assert "return" in a.cmd("blockdev-add", {"driver": "qcow2", "node-name": "s", "file": file})
    assert "return" in a.cmd("nbd-server-start", {"addr": _unix(tmp_path / "nbd.sock")})
    export = {"type": "nbd", "id": "e", "node-name": "s", "writable": True}
    assert "return" in a.cmd("block-export-add", export)
    server = {"type": "unix", "path": str(tmp_path / "proxy.sock")}
    target = {"driver": "nbd", "node-name": "tn", "server": server, "export": "t"}
    assert "return" in a.cmd("blockdev-add", target)
    backup = {"job-id": "j", "device": "s", "target": "tn", "sync": "none"}
    assert "return" in a.cmd("blockdev-backup", backup)

    proxy.pause()
    uri = f"nbd+unix:///s?socket={tmp_path / 'nbd.sock'}"
    writer = subprocess.Popen(
        ["qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        proxy.wait_held()  # the write is inside the filter, its copy stalled on the way
        # The job is idle (sync=none): the cancel answers once the job has ended, which
        # is after the stalled copy; so let the copy go before reading the answer.
        a.send({"execute": "job-cancel", "arguments": {"id": "j"}})
        proxy.resume()
        events = []
        while "event" in (m := a.recv()):
            events.append(m)
        assert "return" in m, m
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0 and "error" not in out.lower(), out
        if not any(e["event"] == "BLOCK_JOB_CANCELLED" for e in events):
            events += _events_until(a, "BLOCK_JOB_CANCELLED", "j")
        assert [e["event"] for e in events].count("BLOCK_JOB_CANCELLED") == 1
        assert "return" in a.cmd("blockdev-del", {"node-name": "tn"})
    finally:
        proxy.close()
        if writer.poll() is None:
            writer.kill()
    # The copy reached the target before the write went on: the target holds the old data.
    drivers = [n["drv"] for n in a.cmd("query-named-block-nodes")["return"]]
    assert sorted(drivers) == ["file", "qcow2"], drivers
    qemu_io("-r", "-U", "-f", "raw", "-c", "read -P 1 0 64k", tgt)
    qemu_io("-f", "raw", "-c", "read -P 7 0 64k", uri)
    log = blockd.log_text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
