"""blockd's NBD client driver against QSD and qemu-nbd exports, QSD's NBD driver against a
blockd export, and a blockd node connected to its own export. Data goes through both
implementations and must come out identical."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from nbdtest import Qmp, add_raw, daemon, make_raw, map_of, uri, wait_path
from support import qemu_img, qemu_io

from blockd.block.drivers.nbd import parse_nbd_uri


def _export(q: Qmp, node: str, sock: Path, name: str) -> str:
    q.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    q.run(
        "block-export-add",
        {"type": "nbd", "id": name, "node-name": node, "name": name, "writable": True},
    )
    return uri(sock, name)


def _exercise(front: str, image: Path) -> None:
    """Write through *front*, read back through it, then check the file itself."""
    qemu_io(
        "-f",
        "raw",
        "-c",
        "write -P 0x61 0 1M",
        "-c",
        "write -P 0x62 3M 64k",
        "-c",
        "write -z 3M 4k",
        "-c",
        "read -P 0x61 0 1M",
        "-c",
        "read -P 0 3M 4k",
        "-c",
        "read -P 0x62 3076k 60k",
        "-c",
        "flush",
        front,
    )
    qemu_io(
        "-U",
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0x61 0 1M",
        "-c",
        "read -P 0 3M 4k",
        "-c",
        "read -P 0x62 3076k 60k",
        image,
    )


def test_blockd_client_on_qsd_export(tmp_path: Path) -> None:
    image = make_raw(tmp_path / "q.raw", 16 << 20)
    qsd_sock = tmp_path / "qsd-nbd.sock"
    with daemon(tmp_path, "qsd") as (_qd, qq), daemon(tmp_path, "blockd") as (_bd, bq):
        add_raw(qq, "disk", image)
        _export(qq, "disk", qsd_sock, "disk")
        bq.run(
            "blockdev-add",
            {
                "driver": "nbd",
                "node-name": "remote",
                "server": {"type": "unix", "path": str(qsd_sock)},
                "export": "disk",
            },
        )
        nodes = bq.run("query-named-block-nodes")["return"]
        assert nodes[0]["file"] == f"nbd+unix:///disk?socket={qsd_sock}"
        assert nodes[0]["image"]["virtual-size"] == 16 << 20
        front = _export(bq, "remote", tmp_path / "b.sock", "front")
        # The allocation map survives two hops (blockd client driver -> QSD export).
        assert map_of(front) == map_of(str(image))
        _exercise(front, image)
        bq.run("block-export-del", {"id": "front"})
        bq.run("blockdev-del", {"node-name": "remote"})


def test_blockd_client_on_qemu_nbd(tmp_path: Path) -> None:
    image = make_raw(tmp_path / "n.raw", 16 << 20)
    sock = tmp_path / "qemu-nbd.sock"
    proc = subprocess.Popen(
        [
            "qemu-nbd",
            "-f",
            "raw",
            "-x",
            "disk",
            "-k",
            str(sock),
            "--shared=4",
            "--persistent",
            "--cache=writeback",
            str(image),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_path(sock)
        with daemon(tmp_path, "blockd") as (_bd, bq):
            bq.run(
                "blockdev-add",
                {
                    "driver": "nbd",
                    "node-name": "remote",
                    "server": {"type": "unix", "path": str(sock)},
                    "export": "disk",
                },
            )
            front = _export(bq, "remote", tmp_path / "b.sock", "front")
            assert map_of(front) == map_of(str(image))
            _exercise(front, image)
    finally:
        proc.terminate()
        proc.wait()


def test_qsd_client_on_blockd_export(tmp_path: Path) -> None:
    image = make_raw(tmp_path / "b.raw", 16 << 20)
    bsock = tmp_path / "blockd-nbd.sock"
    with daemon(tmp_path, "blockd") as (_bd, bq), daemon(tmp_path, "qsd") as (_qd, qq):
        add_raw(bq, "disk", image)
        _export(bq, "disk", bsock, "disk")
        qq.run(
            "blockdev-add",
            {
                "driver": "nbd",
                "node-name": "remote",
                "server": {"type": "unix", "path": str(bsock)},
                "export": "disk",
            },
        )
        front = _export(qq, "remote", tmp_path / "q.sock", "front")
        assert map_of(front) == map_of(str(image))
        _exercise(front, image)
        qq.run("block-export-del", {"id": "front"})
        qq.run("blockdev-del", {"node-name": "remote"})


def test_client_on_own_export_no_deadlock(tmp_path: Path) -> None:
    """QSD 7.2 hangs here; blockd connects to itself and serves both sides."""
    image = make_raw(tmp_path / "s.raw", 16 << 20)
    sock = tmp_path / "self.sock"
    with daemon(tmp_path, "blockd") as (_bd, q):
        add_raw(q, "disk", image)
        _export(q, "disk", sock, "disk")
        q.run(
            "blockdev-add",
            {
                "driver": "nbd",
                "node-name": "loop",
                "server": {"type": "unix", "path": str(sock)},
                "export": "disk",
            },
        )
        q.run(
            "block-export-add",
            {"type": "nbd", "id": "front", "node-name": "loop", "writable": True},
        )
        front = uri(sock, "loop")
        _exercise(front, image)
        # The monitor stays responsive throughout.
        assert q.run("query-block-exports")["return"][0]["id"] == "front"
        # Safe removal is refused while the loop node keeps its connection.
        r = q.cmd("block-export-del", {"id": "disk"})
        assert r["error"]["desc"] == "export 'disk' still in use"
        q.run("block-export-del", {"id": "front"})
        q.run("blockdev-del", {"node-name": "loop"})
        time.sleep(0.1)
        q.run("block-export-del", {"id": "disk"})


def test_client_errors(tmp_path: Path) -> None:
    image = make_raw(tmp_path / "e.raw", 4 << 20)
    sock = tmp_path / "e.sock"
    with daemon(tmp_path, "blockd") as (_bd, q):
        add_raw(q, "disk", image)
        _export(q, "disk", sock, "disk")
        cases = [
            (
                {"type": "unix", "path": str(tmp_path / "none.sock")},
                "disk",
                f"Failed to connect to '{tmp_path / 'none.sock'}': No such file or directory",
            ),
            ({"type": "unix", "path": str(sock)}, "wrong", "Requested export not available"),
            ({"type": "unix", "path": str(sock)}, None, "Requested export not available"),
            (
                {"type": "inet", "host": "127.0.0.1", "port": "1"},
                "disk",
                "Failed to connect to '127.0.0.1:1': Connection refused",
            ),
        ]
        for server, export, desc in cases:
            args = {"driver": "nbd", "node-name": "n", "server": server}
            if export is not None:
                args["export"] = export
            r = q.cmd("blockdev-add", args)
            assert r.get("error", {}).get("desc") == desc, r
        # open-timeout: retry until the server appears. QMP commands are serialised across
        # monitors (as in QSD, whose other monitors wait too), so the server that appears is
        # another process.
        late = tmp_path / "late.sock"
        args = {
            "driver": "nbd",
            "node-name": "late",
            "open-timeout": 5,
            "read-only": True,
            "server": {"type": "unix", "path": str(late)},
            "export": "disk",
        }
        q.send({"execute": "blockdev-add", "arguments": args, "id": "late"})
        time.sleep(0.5)
        server = subprocess.Popen(
            [
                "qemu-nbd",
                "-r",
                "-x",
                "disk",
                "-k",
                str(late),
                "-t",
                "-e",
                "4",
                "--image-opts",
                f"driver=raw,file.driver=file,file.filename={image},file.locking=off",
            ]
        )
        try:
            r = q.reply()
            assert r == {"return": {}, "id": "late"}, r
            _late_server_checks(q, late)
        finally:
            server.terminate()
            server.wait()


def _late_server_checks(q: Qmp, late: Path) -> None:
    """A read-only export: a read-write client node is refused, auto-read-only falls back."""
    r = q.cmd(
        "blockdev-add",
        {
            "driver": "nbd",
            "node-name": "rw",
            "server": {"type": "unix", "path": str(late)},
            "export": "disk",
        },
    )
    assert r["error"]["desc"] == "Could not open image: Permission denied"
    q.run(
        "blockdev-add",
        {
            "driver": "nbd",
            "node-name": "auto",
            "auto-read-only": True,
            "server": {"type": "unix", "path": str(late)},
            "export": "disk",
        },
    )
    ro = {n["node-name"]: n["ro"] for n in q.run("query-named-block-nodes")["return"]}
    assert ro["auto"] is True


def test_reconnect_delay(tmp_path: Path) -> None:
    """With reconnect-delay, a dropped connection is re-established and I/O goes on."""
    image = make_raw(tmp_path / "r.raw", 4 << 20)
    sock = tmp_path / "r.sock"
    proc = None

    def serve() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [
                "qemu-nbd",
                "-f",
                "raw",
                "-x",
                "disk",
                "-k",
                str(sock),
                "--shared=4",
                "--persistent",
                str(image),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_path(sock)
        time.sleep(0.2)
        return p

    try:
        proc = serve()
        with daemon(tmp_path, "blockd") as (_bd, q):
            q.run(
                "blockdev-add",
                {
                    "driver": "nbd",
                    "node-name": "remote",
                    "reconnect-delay": 10,
                    "server": {"type": "unix", "path": str(sock)},
                    "export": "disk",
                },
            )
            front = _export(q, "remote", tmp_path / "b.sock", "front")
            qemu_io("-f", "raw", "-c", "write -P 7 0 64k", front)
            proc.terminate()
            proc.wait()
            sock.unlink(missing_ok=True)
            proc = serve()
            qemu_io("-f", "raw", "-c", "read -P 7 0 64k", "-c", "write -P 8 64k 64k", front)
        qemu_io("-f", "raw", "-U", "-r", "-c", "read -P 8 64k 64k", image)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()


@pytest.mark.parametrize(
    ("target", "want"),
    [
        (
            "nbd+unix:///exp?socket=/tmp/s.sock",
            {"driver": "nbd", "server": {"type": "unix", "path": "/tmp/s.sock"}, "export": "exp"},
        ),
        (
            "nbd+unix://?socket=/tmp/s.sock",
            {"driver": "nbd", "server": {"type": "unix", "path": "/tmp/s.sock"}},
        ),
        (
            "nbd://127.0.0.1:10810/disk%20a",
            {
                "driver": "nbd",
                "server": {"type": "inet", "host": "127.0.0.1", "port": "10810"},
                "export": "disk a",
            },
        ),
        (
            "nbd://localhost/disk",
            {
                "driver": "nbd",
                "server": {"type": "inet", "host": "localhost", "port": "10809"},
                "export": "disk",
            },
        ),
        (
            "nbd://[::1]:5000/x",
            {
                "driver": "nbd",
                "server": {"type": "inet", "host": "::1", "port": "5000"},
                "export": "x",
            },
        ),
        (
            "nbd:unix:/tmp/s.sock:exportname=exp",
            {"driver": "nbd", "server": {"type": "unix", "path": "/tmp/s.sock"}, "export": "exp"},
        ),
        (
            "nbd:unix:/tmp/s.sock",
            {"driver": "nbd", "server": {"type": "unix", "path": "/tmp/s.sock"}},
        ),
        (
            "nbd:10.0.0.1:10809:exportname=e",
            {
                "driver": "nbd",
                "server": {"type": "inet", "host": "10.0.0.1", "port": "10809"},
                "export": "e",
            },
        ),
    ],
)
def test_parse_nbd_uri(target: str, want: dict[str, object]) -> None:
    assert parse_nbd_uri(target) == want


@pytest.mark.parametrize(
    "bad", ["file:///x", "nbd+unix:///x", "nbd://", "nbd:host", "nbd+unix://host/x?socket=/s"]
)
def test_parse_nbd_uri_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_nbd_uri(bad)


def test_parsed_uri_opens(tmp_path: Path) -> None:
    """A parsed URI is valid blockdev-add input."""
    image = make_raw(tmp_path / "u.raw", 4 << 20)
    sock = tmp_path / "u.sock"
    with daemon(tmp_path, "blockd") as (_bd, q):
        add_raw(q, "disk", image)
        target = _export(q, "disk", sock, "disk")
        opts = parse_nbd_uri(target)
        q.run("blockdev-add", {**opts, "node-name": "viauri", "read-only": True})
        qemu_img("info", target)
