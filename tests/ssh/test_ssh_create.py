"""blockdev-create with driver ssh, qcow2 images on ssh nodes, and backing files opened over
ssh, each beside qemu-storage-daemon; images are checked with qemu-img on the remote file."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from diffsupport import Session, qcow2_image
from sshlab import SshLab
from sshtest import Pair
from support import check_image, qemu_img, qemu_io
from test_ssh_io import export, unexport

MiB = 1024 * 1024


def create(s: Session, job: str, options: dict[str, Any]) -> dict[str, Any]:
    """Run a blockdev-create job to its end; returns its query-jobs entry."""
    s.ok("blockdev-create", {"job-id": job, "options": options})
    s.wait_job(job, "concluded")
    info = next(j for j in s.ok("query-jobs") if j["id"] == job)
    s.ok("job-dismiss", {"id": job})
    return dict(info)


def location(lab: SshLab, path: Path, **extra: Any) -> dict[str, Any]:
    return {"server": lab.server(), "path": str(path), **extra}


def test_create_sizes_and_truncation(lab: SshLab, pair: Pair, tmp_path: Path) -> None:
    got = {}
    for kind, s in pair.sessions.items():
        sizes = []
        for i, size in enumerate((0, MiB + 512, 3 * MiB)):
            path = tmp_path / f"{kind}-{i}.img"
            info = create(
                s, f"{kind}c{i}", {"driver": "ssh", "location": location(lab, path), "size": size}
            )
            st = os.stat(path)
            sizes.append((info.get("error"), st.st_size, stat.S_IMODE(st.st_mode)))
        # an existing file is truncated to the new size, its data gone
        path = tmp_path / f"{kind}-old.img"
        path.write_bytes(b"\xff" * (2 * MiB))
        create(s, f"{kind}t", {"driver": "ssh", "location": location(lab, path), "size": MiB})
        qemu_io("-f", "raw", "-c", "read -P 0 0 1M", path)
        sizes.append((None, os.path.getsize(path), None))
        got[kind] = sizes
    assert got["blockd"] == got["qsd"]
    assert got["blockd"][0] == (None, 0, 0o644)


def test_create_errors_are_the_job_error(lab: SshLab, pair: Pair, tmp_path: Path) -> None:
    bad = {
        "hash": {"host-key-check": {"mode": "hash", "type": "sha1", "hash": "00"}},
        "user": {"user": "no-such-user-here"},
        "dir": {"path": str(tmp_path)},
        "port": {"server": lab.server("ssh")},
    }
    got: dict[str, list[Any]] = {}
    for kind, s in pair.sessions.items():
        got[kind] = []
        for name, extra in bad.items():
            loc = {**location(lab, tmp_path / f"{kind}-{name}.img"), **extra}
            info = create(s, f"{kind}e{name}", {"driver": "ssh", "location": loc, "size": MiB})
            got[kind].append(info.get("error"))
    assert got["blockd"] == got["qsd"]
    assert all(got["blockd"]), got


def test_qcow2_on_ssh(lab: SshLab, pair: Pair, tmp_path: Path) -> None:
    """blockdev-create ssh, then qcow2 on it; data written through an NBD export lands in an
    image that qemu-img checks clean and that QSD reads back over ssh."""
    writes = [(0x61, 0, MiB), (0x62, 7 * MiB + 512, 3 * MiB), (0x63, 31 * MiB, MiB)]
    s = pair.sessions["blockd"]
    path = tmp_path / "disk.qcow2"
    create(s, "cs", {"driver": "ssh", "location": location(lab, path), "size": 0})
    s.ok("blockdev-add", {**lab.node("proto", path)})
    create(s, "cq", {"driver": "qcow2", "file": "proto", "size": 32 * MiB})
    s.ok("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "proto"})
    uri = export(s, "blockd", tmp_path, "q")
    for pattern, off, n in writes:
        qemu_io("-f", "raw", "-c", f"write -P {pattern} {off} {n}", uri)
    unexport(s, "q")
    s.ok("blockdev-del", {"node-name": "q"})
    s.ok("blockdev-del", {"node-name": "proto"})
    res = check_image(path)
    assert res["rc"] == 0, res
    # the room reserved while writing was given back at close (no shrink of real data)
    assert os.path.getsize(path) == res["image-end-offset"]
    info = qemu_img("info", "--output=json", path).stdout
    assert '"virtual-size": 33554432' in info
    q = pair.sessions["qsd"]
    q.ok(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "back",
            "file": lab.node("back-ssh", path),
            "read-only": True,
        },
    )
    uri = export(q, "qsd", tmp_path, "back", writable=False)
    for pattern, off, n in writes:
        qemu_io("-r", "-f", "raw", "-c", f"read -P {pattern} {off} {n}", uri)
    qemu_io("-r", "-f", "raw", "-c", f"read -P 0 {MiB} {6 * MiB}", uri)
    unexport(q, "back")
    q.ok("blockdev-del", {"node-name": "back"})


def test_qcow2_create_on_a_bigger_ssh_file(lab: SshLab, pair: Pair, tmp_path: Path) -> None:
    """qcow2 created on an ssh node that already holds 4 MiB of garbage: ssh cannot shrink, so
    QSD writes the image over it and so does blockd; the image works and checks clean."""
    for kind, s in pair.sessions.items():
        path = tmp_path / f"{kind}.qcow2"
        create(s, f"{kind}s", {"driver": "ssh", "location": location(lab, path), "size": 0})
        path.write_bytes(b"\xff" * (4 * MiB))
        s.ok("blockdev-add", {**lab.node("p", path)})
        info = create(s, f"{kind}q", {"driver": "qcow2", "file": "p", "size": 16 * MiB})
        assert info.get("error") is None, info
        s.ok("blockdev-add", {"driver": "qcow2", "node-name": "pq", "file": "p"})
        uri = export(s, kind, tmp_path, "pq")
        qemu_io("-f", "raw", "-c", f"write -P 0x65 {5 * MiB} {MiB}", uri)
        qemu_io(
            "-f", "raw", "-c", f"read -P 0 0 {5 * MiB}", "-c", f"read -P 0x65 {5 * MiB} {MiB}", uri
        )
        unexport(s, "pq")
        s.ok("blockdev-del", {"node-name": "pq"})
        s.ok("blockdev-del", {"node-name": "p"})
        assert check_image(path)["rc"] == 0, kind


def forget_backing_format(path: Path) -> None:
    """Turn the backing format header extension into an unknown one (ignored by readers)."""
    data = bytearray(path.read_bytes()[:4096])
    pos = data.find(bytes.fromhex("e2792aca"), 72)
    assert pos > 0
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(bytes.fromhex("6b6b6b6b"))


def test_backing_files_open_over_ssh(lab: SshLab, pair: Pair, tmp_path: Path) -> None:
    """A qcow2 on an ssh node finds its backing file on the same host: a relative name next to
    it (as QSD does), an absolute name there too (QSD opens that one locally)."""
    base = qcow2_image(tmp_path / "base.qcow2", 8 * MiB, [(0x71, 0, MiB)])
    qemu_img(
        "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "rel.qcow2", "8M"
    )
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", tmp_path / "abs.qcow2", "8M")
    qemu_io("-f", "qcow2", "-c", f"write -P 0x72 {MiB} {MiB}", tmp_path / "rel.qcow2")
    forget_backing_format(tmp_path / "rel.qcow2")  # the backing's format is probed over ssh
    got: dict[str, Any] = {}
    for kind, s in pair.sessions.items():
        s.ok(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "top",
                "file": lab.node("top-ssh", tmp_path / "rel.qcow2"),
                "read-only": True,
            },
        )
        nodes = {n["node-name"]: n for n in s.ok("query-named-block-nodes", {"flat": True})}
        top = nodes["top"]
        backing = next(
            n for n in nodes.values() if n["file"] == top["backing_file"] and n["drv"] == "qcow2"
        )
        uri = export(s, kind, tmp_path, "top", writable=False)
        qemu_io(
            "-r", "-f", "raw", "-c", f"read -P 0x71 0 {MiB}", "-c", f"read -P 0x72 {MiB} {MiB}", uri
        )
        unexport(s, "top")
        s.ok("blockdev-del", {"node-name": "top"})
        got[kind] = (
            top["image"]["full-backing-filename"],
            top["backing_file"],
            backing["image"]["filename"],
        )
    assert got["blockd"] == got["qsd"]
    assert got["blockd"][0] == f"ssh://{lab.user}@127.0.0.1:{lab.port}{base}"
    # absolute backing name: blockd stays on the ssh host
    s = pair.sessions["blockd"]
    s.ok(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "top2",
            "file": lab.node("top2-ssh", tmp_path / "abs.qcow2"),
            "read-only": True,
        },
    )
    nodes = {n["node-name"]: n for n in s.ok("query-named-block-nodes", {"flat": True})}
    protos = [n for n in nodes.values() if n["drv"] == "ssh" and str(tmp_path) in n["file"]]
    assert sorted(n["file"] for n in protos) == sorted(
        f"ssh://{lab.user}@127.0.0.1:{lab.port}{p}" for p in (tmp_path / "abs.qcow2", base)
    )
    s.ok("blockdev-del", {"node-name": "top2"})


def test_snapshot_on_an_image_over_ssh(lab: SshLab, pair: Pair, tmp_path: Path) -> None:
    """An external snapshot turns the qcow2 on ssh read-only under its new overlay (the ssh
    node reopens its remote file; QEMU cannot reopen ssh nodes): data written before stays
    readable through the overlay, new writes land locally, the remote image checks clean."""
    s = pair.sessions["blockd"]
    base = qcow2_image(tmp_path / "base.qcow2", 8 * MiB)
    s.ok("blockdev-add", {"driver": "qcow2", "node-name": "sb", "file": lab.node("sb-ssh", base)})
    uri = export(s, "blockd", tmp_path, "sb")
    qemu_io("-f", "raw", "-c", f"write -P 0x51 0 {MiB}", uri)
    overlay = tmp_path / "overlay.qcow2"
    s.ok(
        "blockdev-snapshot-sync",
        {"node-name": "sb", "snapshot-file": str(overlay), "snapshot-node-name": "ov"},
    )
    nodes = {n["node-name"]: n for n in s.ok("query-named-block-nodes", {"flat": True})}
    assert nodes["sb"]["ro"] and nodes["sb-ssh"]["ro"] and not nodes["ov"]["ro"]
    qemu_io("-f", "raw", "-c", f"write -P 0x52 {MiB} {MiB}", uri)  # the export follows ov
    qemu_io("-f", "raw", "-c", f"read -P 0x51 0 {MiB}", "-c", f"read -P 0x52 {MiB} {MiB}", uri)
    unexport(s, "sb")
    s.ok("blockdev-del", {"node-name": "ov"})
    s.ok("blockdev-del", {"node-name": "sb"})
    assert check_image(base)["rc"] == 0
    qemu_io("-f", "qcow2", "-c", f"read -P 0x51 0 {MiB}", "-c", f"read -P 0 {MiB} {MiB}", base)
