"""External snapshots over QMP: chains that qemu-img reads, exports that follow the active
layer, QSD's error texts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError
from support import connect, qemu_img, qemu_io


def _chain(path: Path) -> list[tuple[str, str | None]]:
    info = json.loads(qemu_img("info", "-U", "--backing-chain", "--output=json", path).stdout)
    return [(Path(i["filename"]).name, i.get("backing-filename")) for i in info]


async def test_snapshot_sync_three_times_builds_the_chain(blockd: Any, tmp_path: Path) -> None:
    a = tmp_path / "A.qcow2"
    qemu_img("create", "-f", "qcow2", a, "16M")
    qemu_io("-c", "write -P 0x11 0 1M", a)
    async with connect(blockd.sock) as (c, _):
        await c.execute(
            "blockdev-add",
            {"driver": "qcow2", "node-name": "A", "file": {"driver": "file", "filename": str(a)}},
        )
        for prev, new in [("A", "B"), ("B", "C"), ("C", "D")]:
            await c.execute(
                "blockdev-snapshot-sync",
                {
                    "node-name": prev,
                    "snapshot-file": str(tmp_path / f"{new}.qcow2"),
                    "snapshot-node-name": new,
                    "format": "qcow2",
                },
            )
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert nodes["D"]["backing_file_depth"] == 3
        assert not nodes["D"]["ro"]
        assert nodes["A"]["ro"] and nodes["B"]["ro"] and nodes["C"]["ro"]
        assert nodes["D"]["image"]["backing-image"]["backing-image"]["filename"] == str(
            tmp_path / "B.qcow2"
        )
    assert _chain(tmp_path / "D.qcow2") == [
        ("D.qcow2", str(tmp_path / "C.qcow2")),
        ("C.qcow2", str(tmp_path / "B.qcow2")),
        ("B.qcow2", str(tmp_path / "A.qcow2")),
        ("A.qcow2", None),
    ]
    for n in "ABCD":
        assert "No errors were found" in qemu_img("check", "-U", tmp_path / f"{n}.qcow2").stdout
    qemu_io("-r", "-U", "-c", "read -P 0x11 0 1M", tmp_path / "D.qcow2")


async def test_export_follows_the_active_layer(blockd: Any, tmp_path: Path) -> None:
    a = tmp_path / "A.qcow2"
    qemu_img("create", "-f", "qcow2", a, "16M")
    nbd = tmp_path / "nbd.sock"
    async with connect(blockd.sock) as (c, _):
        await c.execute(
            "blockdev-add",
            {"driver": "qcow2", "node-name": "A", "file": {"driver": "file", "filename": str(a)}},
        )
        await c.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}})
        await c.execute(
            "block-export-add", {"type": "nbd", "id": "e0", "node-name": "A", "writable": True}
        )
        uri = f"nbd+unix:///A?socket={nbd}"
        qemu_io("-f", "raw", "-c", "write -P 0x0a 0 64k", uri)
        for prev, new in [("A", "B"), ("B", "C"), ("C", "D")]:
            await c.execute(
                "blockdev-snapshot-sync",
                {
                    "node-name": prev,
                    "snapshot-file": str(tmp_path / f"{new}.qcow2"),
                    "snapshot-node-name": new,
                },
            )
        exports = await c.execute("query-block-exports")
        assert [e["node-name"] for e in exports] == ["D"]
        qemu_io("-f", "raw", "-c", "write -P 0x0d 1M 64k", uri)
        qemu_io("-f", "raw", "-c", "read -P 0x0a 0 64k", "-c", "read -P 0x0d 1M 64k", uri)
        await c.execute("block-export-del", {"id": "e0"})
        await c.execute("nbd-server-stop")
    # The second write went into D, the first one stayed in A.
    d_map = json.loads(qemu_img("map", "-U", "--output=json", tmp_path / "D.qcow2").stdout)
    in_d = [m for m in d_map if m["data"] and m["depth"] == 0]
    assert [(m["start"], m["length"]) for m in in_d] == [(1 << 20, 65536)]
    qemu_io("-r", "-U", "-c", "read -P 0x0a 0 64k", "-c", "read -P 0 1M 64k", a)


async def test_blockdev_snapshot_with_existing_overlay(blockd: Any, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, "8M")
    qemu_io("-c", "write -P 0x22 0 512k", base)
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    async with connect(blockd.sock) as (c, _):
        await c.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "base",
                "file": {"driver": "file", "filename": str(base)},
            },
        )
        await c.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "top",
                "backing": None,
                "file": {"driver": "file", "filename": str(top)},
            },
        )
        with pytest.raises(ExecuteError) as ei:
            await c.execute("blockdev-snapshot", {"node": "base", "overlay": "base"})
        assert (
            ei.value.error.error.desc
            == "Making 'base' a backing child of 'base' would create a cycle"
        )
        await c.execute("blockdev-snapshot", {"node": "base", "overlay": "top"})
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert nodes["top"]["backing_file_depth"] == 1 and nodes["base"]["ro"]
        with pytest.raises(ExecuteError) as ei:
            await c.execute("blockdev-snapshot", {"node": "base", "overlay": "top"})
        assert (
            ei.value.error.error.desc == "Node 'base' is busy: node is used as backing hd of 'top'"
        )


SNAP_ERRORS: list[dict[str, Any]] = [
    {"node-name": "s1", "snapshot-file": "$TMP/x.qcow2"},
    {"node-name": "src", "snapshot-file": "$TMP/x.qcow2"},
    {"node-name": "src", "snapshot-file": "$TMP/x.qcow2", "snapshot-node-name": "src"},
    {"node-name": "src", "snapshot-file": "$TMP/x.raw", "snapshot-node-name": "x", "format": "raw"},
    {
        "node-name": "src",
        "snapshot-file": "$TMP/none.qcow2",
        "snapshot-node-name": "y",
        "mode": "existing",
    },
]


async def test_snapshot_errors_match_qsd(
    blockd_factory: Any, qsd_factory: Any, tmp_path: Path
) -> None:
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", src, "8M")
    results = []
    for daemon in (qsd_factory(), blockd_factory()):
        out = []
        async with connect(daemon.sock) as (c, _):
            await c.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": "src",
                    "read-only": True,
                    "file": {"driver": "file", "filename": str(src)},
                },
            )
            for args in SNAP_ERRORS:
                real = {
                    k: v.replace("$TMP", str(tmp_path)) if isinstance(v, str) else v
                    for k, v in args.items()
                }
                try:
                    await c.execute("blockdev-snapshot-sync", real)
                    out.append("ok")
                except ExecuteError as exc:
                    out.append(exc.error.error.desc)
            await c.execute("blockdev-del", {"node-name": "src"})
        results.append(out)
    assert results[0] == results[1]


async def test_snapshot_in_transaction_all_or_nothing(blockd: Any, tmp_path: Path) -> None:
    a = tmp_path / "A.qcow2"
    qemu_img("create", "-f", "qcow2", a, "8M")
    async with connect(blockd.sock) as (c, _):
        await c.execute(
            "blockdev-add",
            {"driver": "qcow2", "node-name": "A", "file": {"driver": "file", "filename": str(a)}},
        )
        snap = {
            "type": "blockdev-snapshot-sync",
            "data": {
                "node-name": "A",
                "snapshot-file": str(tmp_path / "B.qcow2"),
                "snapshot-node-name": "B",
            },
        }
        with pytest.raises(ExecuteError) as ei:
            await c.execute(
                "transaction",
                {
                    "actions": [
                        {"type": "block-dirty-bitmap-add", "data": {"node": "A", "name": "b0"}},
                        snap,
                        {"type": "abort", "data": {}},
                    ]
                },
            )
        assert ei.value.error.error.desc == "Transaction aborted using Abort action"
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert "B" not in nodes and not nodes["A"]["ro"] and "dirty-bitmaps" not in nodes["A"]
        await c.execute(
            "transaction",
            {
                "actions": [
                    snap,
                    {"type": "block-dirty-bitmap-add", "data": {"node": "B", "name": "b1"}},
                ]
            },
        )
        nodes = {n["node-name"]: n for n in await c.execute("query-named-block-nodes")}
        assert nodes["A"]["ro"] and nodes["B"]["backing_file_depth"] == 1
        assert [b["name"] for b in nodes["B"]["dirty-bitmaps"]] == ["b1"]
