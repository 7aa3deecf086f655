"""Hostile input in paths, host names and ports gets QEMU's error class and text, never an
internal error with Python's: a table of cases played against blockd and qemu-storage-daemon in
the same run, compared reply by reply.

QEMU hands strings to the C library with U+0000 as the bytes C0 80, so a NUL in a path names
a different file (opening it fails with ENOENT, creating it works) and a host label over 63
characters or a port like "abc" is judged by getaddrinfo; blockd does the same.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rawclient import RawQmp
from support import qemu_img, start_blockd, start_qsd

LONG_HOST = "a" * 70 + ".example"


def _inet(host: str, port: str) -> dict[str, Any]:
    return {"type": "inet", "data": {"host": host, "port": port}}


def _nbd_node(name: str, server: dict[str, Any]) -> dict[str, Any]:
    return {"driver": "nbd", "node-name": name, "server": server}


CASES: list[tuple[str, dict[str, Any]]] = [
    ("nbd-server-start", {"addr": _inet(LONG_HOST, "10809")}),
    ("nbd-server-start", {"addr": _inet("127.0.0.1", "abc")}),
    ("nbd-server-start", {"addr": _inet("127.0.0.1", "1\u0000")}),
    ("nbd-server-start", {"addr": _inet("127.0.0\u0000.1", "0")}),
    ("nbd-server-start", {"addr": _inet("127.0.0.1", "99999999")}),
    ("nbd-server-stop", {}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "$DIR/n\u0000b.sock"}}}),
    ("nbd-server-stop", {}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "$DIR/" + "x" * 120}}}),
    ("blockdev-add", _nbd_node("n1", {"type": "inet", "host": LONG_HOST, "port": "10809"})),
    (
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": "r1",
            "file": _nbd_node("n2", {"type": "inet", "host": LONG_HOST, "port": "1"}),
        },
    ),
    ("blockdev-add", _nbd_node("n3", {"type": "inet", "host": "127.0.0.1", "port": "abc"})),
    ("blockdev-add", _nbd_node("n4", {"type": "inet", "host": "127.0.0.1", "port": "1\u0000"})),
    ("blockdev-add", _nbd_node("n5", {"type": "inet", "host": "127.0.0.1", "port": "99999999"})),
    ("blockdev-add", _nbd_node("n6", {"type": "inet", "host": "127.0\u0000.0.1", "port": "1"})),
    ("blockdev-add", _nbd_node("n7", {"type": "unix", "path": "$DIR/none\u0000.sock"})),
    ("blockdev-add", _nbd_node("n8", {"type": "unix", "path": "$DIR/" + "y" * 120})),
    ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": "$DIR/a.raw\u0000x"}),
    (
        "blockdev-add",
        {"driver": "raw", "node-name": "r2", "file": {"driver": "file", "filename": "\u0000"}},
    ),
    (
        "blockdev-add",
        {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "$DIR/a.raw"}},
    ),
    (
        "drive-backup",
        {
            "device": "r",
            "job-id": "j1",
            "sync": "full",
            "target": "$DIR/t\u0000.raw",
            "format": "raw",
            "mode": "existing",
        },
    ),
    (
        "drive-backup",
        {
            "device": "r",
            "job-id": "j2",
            "sync": "full",
            "target": "$DIR/t\u0000.raw",
            "format": "raw",
        },
    ),
    (
        "blockdev-snapshot-sync",
        {
            "node-name": "r",
            "snapshot-file": "$DIR/s\u0000.qcow2",
            "snapshot-node-name": "s",
            "format": "qcow2",
            "mode": "existing",
        },
    ),
    (
        "blockdev-snapshot-sync",
        {
            "node-name": "r",
            "snapshot-file": "$DIR/s\u0000.qcow2",
            "snapshot-node-name": "s",
            "format": "qcow2",
        },
    ),
    (
        "blockdev-create",
        {
            "job-id": "c1",
            "options": {"driver": "file", "filename": "$DIR/c\u0000.raw", "size": 65536},
        },
    ),
]


def _subst(value: Any, d: Path) -> Any:
    return json.loads(json.dumps(value).replace("$DIR", str(d)))


def _play(kind: str, d: Path) -> list[Any]:
    d.mkdir()
    qemu_img("create", "-f", "raw", d / "a.raw", "1M")
    daemon = start_blockd(d) if kind == "blockd" else start_qsd(d)
    out: list[Any] = []
    try:
        q = RawQmp(daemon.sock, timeout=30)
        q.negotiate()
        for name, args in CASES:
            reply = q.cmd(name, _subst(args, d))
            # Compare class and text only; paths written relative to the daemon's directory.
            out.append(json.loads(json.dumps(reply.get("error", "ok")).replace(str(d), "$DIR")))
        for _ in range(200):
            if all(j["status"] == "concluded" for j in q.cmd("query-jobs")["return"]):
                break
            time.sleep(0.05)
        # What a NUL in a name created: the same file names on both (C0 80 for the NUL).
        out.append(sorted(p.name for p in d.iterdir() if b"\xc0\x80" in bytes(p)))
        q.close()
    finally:
        daemon.stop()
    return out


def test_bad_paths_hosts_and_ports_match_qsd(tmp_path: Path) -> None:
    got = {kind: _play(kind, tmp_path / kind) for kind in ("blockd", "qsd")}
    rows = [
        f"{name} {json.dumps(args)[:90]}\n  qsd:    {w}\n  blockd: {g}"
        for (name, args), w, g in zip(CASES, got["qsd"], got["blockd"], strict=False)
        if w != g
    ]
    assert not rows, "\n".join(rows)
    assert got["blockd"] == got["qsd"]
    for err in got["blockd"][: len(CASES)]:
        assert err == "ok" or "Internal error" not in err["desc"]
