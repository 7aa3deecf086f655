"""Reads, writes, flush, resize and node info of ssh nodes, blockd beside qemu-storage-daemon:
I/O goes through an NBD export of a raw node on the ssh node (qemu-io), results are checked on
the remote file itself (the lab's server is this machine) with qemu-img compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from diffsupport import Session, compare, raw_image
from sshlab import SshLab
from sshtest import Pair, started_pair
from support import qemu_io

from blockd.block.drivers.ssh import session as ssh_session

MiB = 1024 * 1024
WRITES = [(0x11, 0, 65536), (0x22, 3 * MiB - 512, 1536), (0x33, 5 * MiB + 4096, 2 * MiB + 123)]


def export(s: Session, kind: str, tmp: Path, node: str, writable: bool = True) -> str:
    sock = tmp / f"{kind}.nbd"
    s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    s.ok(
        "block-export-add",
        {"type": "nbd", "id": node, "node-name": node, "writable": writable},
    )
    return f"nbd+unix:///{node}?socket={sock}"


def unexport(s: Session, node: str) -> None:
    s.ok("block-export-del", {"id": node})
    s.wait(lambda e: e["event"] == "BLOCK_EXPORT_DELETED" and e["data"]["id"] == node)
    s.ok("nbd-server-stop")


def raw_on_ssh(lab: SshLab, name: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {"driver": "raw", "node-name": name, "file": lab.node(f"{name}-ssh", path), **extra}


def test_nbd_writes_reach_the_remote_file(lab: SshLab, pair: Pair, tmp_path: Path) -> None:
    expected = raw_image(tmp_path / "expected.raw", 8 * MiB)
    for pattern, off, n in WRITES:
        qemu_io("-f", "raw", "-c", f"write -P {pattern} {off} {n}", expected)
    for kind, s in pair.sessions.items():
        remote = raw_image(tmp_path / f"{kind}.raw", 8 * MiB)
        s.ok("blockdev-add", raw_on_ssh(lab, "disk", remote))
        uri = export(s, kind, tmp_path, "disk")
        cmds: list[str] = []
        for pattern, off, n in WRITES:
            cmds += ["-c", f"write -P {pattern} {off} {n}"]
        qemu_io("-f", "raw", *cmds, uri)
        for pattern, off, n in WRITES:
            qemu_io("-f", "raw", "-c", f"read -P {pattern} {off} {n}", uri)
        # a read spanning several SFTP pieces and the request window
        out = qemu_io("-f", "raw", "-c", "read -v 0 4M", uri).stdout
        assert "11 11 11 11" in out
        unexport(s, "disk")
        s.ok("blockdev-del", {"node-name": "disk"})
        assert compare(remote, expected), kind


def test_reads_past_the_remote_end_are_zeroes(lab: SshLab, pair: Pair, tmp_path: Path) -> None:
    """The file shrinks behind the node's back: the node keeps its size, the tail reads as
    zeroes in both daemons."""
    for kind, s in pair.sessions.items():
        remote = raw_image(tmp_path / f"{kind}.raw", 2 * MiB, [(0x5A, 0, 2 * MiB)])
        s.ok("blockdev-add", raw_on_ssh(lab, "short", remote))
        os.truncate(remote, MiB + 512)
        uri = export(s, kind, tmp_path, "short", writable=False)
        qemu_io("-r", "-f", "raw", "-c", f"read -P 0x5a 0 {MiB + 512}", uri)
        qemu_io("-r", "-f", "raw", "-c", f"read -P 0 {MiB + 512} {MiB - 512}", uri)
        unexport(s, "short")
        s.ok("blockdev-del", {"node-name": "short"})


def test_node_info_like_qsd(lab: SshLab, pair: Pair, tmp_path: Path) -> None:
    remote = raw_image(tmp_path / "disk.raw", 4 * MiB)
    got = {}
    for kind, s in pair.sessions.items():
        s.ok("blockdev-add", raw_on_ssh(lab, "info", remote, **{"read-only": True}))
        nodes = s.ok("query-named-block-nodes", {"flat": True})
        got[kind] = sorted(
            (n for n in nodes if n["node-name"] in ("info", "info-ssh")),
            key=lambda n: str(n["node-name"]),
        )
        s.ok("blockdev-del", {"node-name": "info"})
    assert got["blockd"] == got["qsd"]
    assert got["blockd"][1]["file"] == f"ssh://{lab.user}@127.0.0.1:{lab.port}{remote}"
    assert "actual-size" not in got["blockd"][1]["image"]


@pytest.fixture(scope="module")
def logging_lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A second server whose (external) sftp-server logs every open, close and fsync."""
    root = tmp_path_factory.mktemp("sftplog")
    server = SshLab(root, sftp=f"/usr/lib/openssh/sftp-server -e -l VERBOSE 2>>{root / 'sftp.log'}")
    yield server
    server.stop()


def test_flush_reaches_the_server_as_fsync(logging_lab: SshLab, tmp_path: Path) -> None:
    lab = logging_lab
    log = lab.root / "sftp.log"
    with started_pair(lab, tmp_path) as pair:
        for kind, s in pair.sessions.items():
            remote = raw_image(tmp_path / f"{kind}.raw", MiB)
            s.ok("blockdev-add", raw_on_ssh(lab, "fl", remote))
            uri = export(s, kind, tmp_path, "fl")
            before = log.read_text().count(f'fsync "{remote}"')
            qemu_io("-f", "raw", "-c", "write -P 7 0 64k", "-c", "flush", uri)
            after = log.read_text().count(f'fsync "{remote}"')
            unexport(s, "fl")
            s.ok("blockdev-del", {"node-name": "fl"})
            assert after > before, (kind, log.read_text()[-2000:])


FILTER = Path(__file__).resolve().parent / "sftp_filter.py"


def test_a_server_without_fsync_warns_once_and_flushes_succeed(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """A server that does not offer fsync@openssh.com (OpenSSH's sftp-server with the
    extension taken out of its VERSION reply): as in QEMU, flushes still succeed, with one
    warning per node however many flushes come, and the data reaches the remote file."""
    lab = SshLab(tmp_path_factory.mktemp("nofsync"), sftp=f"{sys.executable} {FILTER} --no-fsync")
    try:
        with started_pair(lab, tmp_path) as pair:
            for kind, s in pair.sessions.items():
                remote = raw_image(tmp_path / f"{kind}.raw", MiB)
                s.ok("blockdev-add", raw_on_ssh(lab, "nf", remote))
                uri = export(s, kind, tmp_path, "nf")
                writes = [("write -P 7 0 64k", "flush"), ("write -P 8 64k 64k", "flush")]
                qemu_io("-f", "raw", *[a for w in writes for c in w for a in ("-c", c)], uri)
                unexport(s, "nf")
                s.ok("blockdev-del", {"node-name": "nf"})
                data = remote.read_bytes()
                assert data[: 64 * 1024] == b"\x07" * 65536, kind
                assert data[64 * 1024 : 128 * 1024] == b"\x08" * 65536, kind
            logs = {kind: d.log_text() for kind, d in pair.daemons.items()}
    finally:
        lab.stop()
    for kind, text in logs.items():
        warned = [line for line in text.splitlines() if "does not support fsync" in line]
        assert len(warned) == 1, (kind, text[-2000:])
        assert "ssh server 127.0.0.1 does not support fsync" in warned[0], (kind, warned)


def test_short_reads_are_continued_and_requests_in_flight_are_bounded(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """A server that answers every read with at most 10,000 bytes (OpenSSH's own limit is
    261,120): both daemons still read the file exactly. Then a backup's parallel copy tasks
    read through one blockd connection: more than one request is in flight (the pipelining is
    real) and never more than the connection's window."""
    log = tmp_path / "inflight.log"
    sftp = f"{sys.executable} {FILTER} --cap-read 10000 --log {log}"
    lab = SshLab(tmp_path_factory.mktemp("shortreads"), sftp=sftp)
    remote = tmp_path / "r.raw"
    remote.write_bytes(os.urandom(8 * MiB))
    try:
        with started_pair(lab, tmp_path) as pair:
            for kind, s in pair.sessions.items():
                s.ok("blockdev-add", raw_on_ssh(lab, "sr", remote, **{"read-only": True}))
                uri = export(s, kind, tmp_path, "sr", writable=False)
                res = subprocess.run(
                    ["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(remote)],
                    capture_output=True,
                    text=True,
                )
                unexport(s, "sr")
                s.ok("blockdev-del", {"node-name": "sr"})
                assert res.returncode == 0, (kind, res.stdout, res.stderr)
            log.write_text("")  # from here on, one new connection: the backup's
            s = pair.sessions["blockd"]
            s.ok("blockdev-add", raw_on_ssh(lab, "src", remote, **{"read-only": True}))
            s.ok("blockdev-add", {"driver": "null-co", "node-name": "sink", "size": 8 * MiB})
            s.ok(
                "blockdev-backup",
                {"job-id": "b", "device": "src", "target": "sink", "sync": "full"},
            )
            s.wait_job("b", "null")
            s.ok("blockdev-del", {"node-name": "src"})
    finally:
        lab.stop()
    most = max(int(line) for line in log.read_text().split())
    assert 1 < most <= ssh_session.WINDOW, most


def test_truncate_rules(lab: SshLab, tmp_path: Path) -> None:
    """Grows like QEMU (the remote file follows), refuses to shrink below data with QEMU's text
    and preallocation with QEMU's text, but may give back a tail it grew itself and never wrote
    (what a qcow2 does with its growth reserve at close). The driver's truncate is driven in a
    child process with the lab's passwd entry, so that the shrink-below-data and
    preallocation cases, which block_resize never asks for, are reached too."""
    remote = raw_image(tmp_path / "t.raw", MiB, [(0x21, 0, MiB)])
    child = Path(__file__).resolve().parent / "ssh_truncate_child.py"
    res = subprocess.run(
        [sys.executable, str(child), str(lab.port), str(remote)],
        env={**lab.env(), "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    steps = json.loads(res.stdout.splitlines()[-1])
    shrink = "ssh driver does not support shrinking files"
    assert steps == [
        ["grow", "ok", 3 * MiB, 3 * MiB],
        ["give back what it grew", "ok", 2 * MiB, 2 * MiB],
        ["shrink below written data", shrink, 2 * MiB, 2 * MiB],
        ["falloc", "Unsupported preallocation mode 'falloc'", 2 * MiB, 2 * MiB],
        ["grow again", "ok", 5 * MiB, 5 * MiB],
        ["shrink to the written end", "ok", 2 * MiB, 2 * MiB],
    ]
    qemu_io(
        "-f", "raw", "-c", f"read -P 0x21 0 {MiB}", "-c", f"read -P 0 {MiB} {MiB - 4096}", remote
    )
