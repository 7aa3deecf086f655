"""Export lifecycle details: dirty-bitmap contexts (once bitmaps exist), the export following
its node through graph replacement, and daemon shutdown with clients connected."""

from __future__ import annotations

import signal
from pathlib import Path

from nbdtest import Qmp, RawNbd, add_raw, daemon, make_raw, uri
from support import qemu_io, run

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockUser
from blockd.block.perm import Perm
from blockd.nbd import protocol as P
from blockd.nbd.export import NbdExport
from blockd.qapi.base import ArgsValidator
from blockd.qapi.block import BlockdevOptions


def _bitmap_map(q: Qmp, tmp: Path, tag: str, image: Path) -> tuple[str, str]:
    add_raw(q, "src", image)
    sock = tmp / f"{tag}.sock"
    q.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    q.run("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
    q.run(
        "block-export-add",
        {"type": "nbd", "id": "w", "node-name": "src", "name": "w", "writable": True},
    )
    qemu_io(
        "-f",
        "raw",
        "-c",
        "write -P 1 64k 64k",
        "-c",
        "write -P 2 1M 200k",
        "-c",
        "write -z 3M 4k",
        uri(sock, "w"),
    )
    q.run("block-dirty-bitmap-disable", {"node": "src", "name": "b0"})
    q.run(
        "block-export-add",
        {"type": "nbd", "id": "r", "node-name": "src", "name": "r", "bitmaps": ["b0"]},
    )
    out = run("nbdinfo", "--map=qemu:dirty-bitmap:b0", uri(sock, "r")).stdout
    busy = q.cmd("block-dirty-bitmap-remove", {"node": "src", "name": "b0"})
    return out, busy.get("error", {}).get("desc", "")


def test_dirty_bitmap_context_matches_qsd(tmp_path: Path) -> None:
    image = make_raw(tmp_path / "bm.raw", 8 << 20)
    with daemon(tmp_path, "blockd") as (_d, q):
        got = _bitmap_map(q, tmp_path, "b", image)
    with daemon(tmp_path, "qsd") as (_d, q):
        want = _bitmap_map(q, tmp_path, "q", image)
    assert got == want
    assert "dirty" in got[0]


async def test_export_follows_node_replacement() -> None:
    """Snapshots and pivots move the export's edge; requests go to the new node."""
    graph = BlockGraph()
    v = ArgsValidator(BlockdevOptions)
    old = await graph.add(
        v.validate({"driver": "null-co", "node-name": "old", "size": 1 << 20, "read-zeroes": True})
    )
    new = await graph.add(v.validate({"driver": "null-co", "node-name": "new", "size": 1 << 20}))
    edge = BlockUser("an unnamed block device").attach(old, Perm.WRITE, Perm.all())
    exp = NbdExport(
        "e",
        "e",
        edge,
        description=None,
        writable=True,
        writethrough=False,
        bitmaps=[],
        allocation_depth=False,
        multi_conn=True,
    )
    assert exp.info()["node-name"] == "old"
    graph.replace(old, new)
    assert exp.node is new and exp.info()["node-name"] == "new"
    exts = await exp.context_extents(P.CONTEXT_BASE_ALLOCATION, 0, 1 << 20, 10)
    assert exts == [(1 << 20, 0)]  # null-co without read-zeroes reports data
    await exp.release()
    assert not new.parents
    await graph.close_all()


def test_snapshot_moves_export(tmp_path: Path) -> None:
    with daemon(tmp_path, "blockd") as (_d, q):
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-f", "qcow2", str(base), "4M")
        q.run(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "exported",
                "file": {"driver": "file", "filename": str(base)},
            },
        )
        sock = tmp_path / "s.sock"
        q.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        q.run(
            "block-export-add",
            {"type": "nbd", "id": "e0", "node-name": "exported", "writable": True},
        )
        q.run(
            "blockdev-snapshot-sync",
            {
                "node-name": "exported",
                "snapshot-node-name": "snap",
                "snapshot-file": str(tmp_path / "snap.qcow2"),
            },
        )
        assert q.run("query-block-exports")["return"][0]["node-name"] == "snap"
        qemu_io("-f", "raw", "-c", "write -P 9 0 64k", uri(sock, "exported"))
    qemu_io("-f", "qcow2", "-c", "read -P 9 0 64k", tmp_path / "snap.qcow2")
    qemu_io("-f", "qcow2", "-c", "read -P 0 0 64k", base)


def test_daemon_exit_with_clients_connected(tmp_path: Path) -> None:
    image = make_raw(tmp_path / "x.raw", 4 << 20)
    with daemon(tmp_path, "blockd") as (d, q):
        add_raw(q, "src", image)
        sock = tmp_path / "x.sock"
        q.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        q.run("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "writable": True})
        clients = []
        for _ in range(3):
            c = RawNbd(str(sock))
            c.go("src")
            clients.append(c)
        negotiating = RawNbd(str(sock))
        negotiating.greeting()
        assert clients[0].request(P.CMD_WRITE, 0, 4096, payload=b"z" * 4096)["error"] == 0
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=20) == 0
        for c in [*clients, negotiating]:
            assert c.sock.recv(10) == b""
            c.close()
    assert not sock.exists()
    with open(image, "rb") as f:
        assert f.read(4096) == b"z" * 4096
