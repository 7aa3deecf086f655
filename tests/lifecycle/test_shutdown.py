"""Shutdown ends within a bounded time whatever it waits for (a command retrying a server, a
job reading from a server that stopped answering), and stores what it can: the persistent
bitmaps of the nodes that still work."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from diffsupport import MiB, Session, qcow2_image, qcow2_node, raw_image, raw_node
from lifesupport import image_bitmaps
from support import Daemon, start_blockd, start_qsd

#: What the daemon's shutdown bounds add up to in these cases (commands 2 s, jobs 3 + 3 s,
#: one node close at most 10 s), with room for a loaded machine.
BOUND = 20.0


def _add_persistent_bitmap(s: Session, tmp: Path) -> Path:
    img = qcow2_image(tmp / "p.qcow2", 16 * MiB)
    s.ok("blockdev-add", qcow2_node("p", img))
    s.ok("block-dirty-bitmap-add", {"node": "p", "name": "b", "persistent": True})
    return img


def _ended_in_bound(d: Daemon, t0: float, img: Path) -> None:
    """The daemon told to stop at *t0* exited 0 within BOUND, removed its socket and stored
    the bitmap of *img*."""
    rc = d.proc.wait(timeout=BOUND + 10)
    elapsed = time.monotonic() - t0
    assert rc == 0, d.log_text()
    assert elapsed < BOUND, elapsed
    assert not d.sock.exists()
    assert image_bitmaps(img) == [{"name": "b", "granularity": 65536, "flags": ["auto"]}]


@pytest.mark.parametrize("how", ["quit", "sigterm"])
def test_pending_nbd_open_does_not_hold_the_exit(tmp_path: Path, how: str) -> None:
    d = start_blockd(tmp_path)
    s = Session(d.sock)
    img = _add_persistent_bitmap(s, tmp_path)
    waiting = Session(d.sock)
    # Nobody listens there: blockdev-add retries for open-timeout seconds.
    waiting.raw.send(
        {
            "execute": "blockdev-add",
            "arguments": {
                "driver": "nbd",
                "node-name": "n",
                "server": {"type": "unix", "path": str(tmp_path / "nobody.sock")},
                "open-timeout": 120,
            },
        }
    )
    time.sleep(0.5)
    t0 = time.monotonic()
    if how == "quit":
        assert s.ok("quit") == {}
    else:
        d.proc.send_signal(signal.SIGTERM)
    _ended_in_bound(d, t0, img)
    s.close()
    waiting.close()


def test_backup_from_a_server_that_stopped_answering_does_not_hold_the_exit(
    tmp_path: Path,
) -> None:
    base = raw_image(tmp_path / "base.raw", 16 * MiB, [(0x11, 0, 16 * MiB)])
    nbd_sock = tmp_path / "nbd.sock"
    # A source served slowly (64 KiB/s), so the backup's first read is surely in flight when
    # the server stops.
    server = start_qsd(
        tmp_path,
        "--object",
        "throttle-group,id=tg,x-bps-read=65536",
        "--blockdev",
        f"driver=file,node-name=f,filename={base}",
        "--blockdev",
        "driver=throttle,node-name=t,throttle-group=tg,file=f",
        "--nbd-server",
        f"addr.type=unix,addr.path={nbd_sock}",
        "--export",
        "type=nbd,id=e,node-name=t,name=src",
        name="server",
    )
    d = start_blockd(tmp_path)
    try:
        s = Session(d.sock)
        img = _add_persistent_bitmap(s, tmp_path)
        s.ok(
            "blockdev-add",
            {
                "driver": "nbd",
                "node-name": "src",
                "server": {"type": "unix", "path": str(nbd_sock)},
                "export": "src",
                "read-only": True,
            },
        )
        target = raw_image(tmp_path / "t.raw", 16 * MiB)
        s.ok("blockdev-add", raw_node("tgt", target))
        s.ok("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"})
        s.wait_job("j", "running")
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        _ended_in_bound(d, t0, img)
        s.close()
    finally:
        d.stop()
        # The stand-in server would drain its throttled reads on SIGTERM: not worth waiting.
        server.proc.kill()
        server.proc.wait()
