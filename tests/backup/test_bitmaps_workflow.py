"""The incremental backup workflow of QEMU's docs/interop/bitmaps.rst, end to end.

A qcow2 node ``src`` is exported writable over NBD; qemu-io writes to it over NBD, as a guest
would. Then, as the document's workflow goes:

1. one ``transaction`` adds bitmap ``bitmap0`` and starts a full ``blockdev-backup`` into a
   pre-created qcow2 node;
2. writes arrive over NBD;
3. a first incremental (``blockdev-backup`` sync=incremental) goes into a qcow2 image backed
   by the full backup; more writes; a second incremental (``drive-backup`` sync=incremental
   mode=existing) goes into an image qemu-img created with the first incremental as backing;
4. after each backup the bitmap's count is 0, and the backup chain equals (``qemu-img compare``)
   a copy of the export taken over NBD when the backup started, which itself must equal a raw
   shadow image that received the same writes.

The scenario is played twice: typed into ``qmp-shell`` (a subprocess fed lines in its own
syntax, replies read from its output) and through the qemu.qmp library. Each time it runs on
blockd and on qemu-storage-daemon 7.2, and the two must show the same events (names, order and
data, timestamps aside), the same bitmap counts, the same job results and backups with the same
contents and the same allocation in every layer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from diffsupport import MiB, compare, qcow2_image, qcow2_node
from qemu.qmp import QMPClient
from shellclient import ShellClient
from support import EventLog, connect, qemu_img, qemu_io, start_blockd, start_qsd

SIZE = 32 * MiB
INITIAL = [(0x5A, 0, 3 * MiB), (0x6B, 10 * MiB, MiB), (0x7C, 30 * MiB, 64 * 1024 + 100)]
#: qemu-io commands written over NBD before the first and before the second incremental:
#: aligned and unaligned writes, write-zeroes, overlaps with the initial data and each other.
WRITES_1 = [
    "write -P 0x11 0 64k",
    "write -P 0x12 5243392 3000",
    "write -z 10560k 128k",
    "write -P 0x13 20M 1M",
]
WRITES_2 = [
    "write -P 0x21 32k 64k",
    "write -P 0x22 20992k 1M",
    "write -z 0 4k",
    "write -P 0x23 32509952 4096",
    "write -P 0x24 7340033 70000",
]


# -- two ways to talk QMP ----------------------------------------------------------------------
class Client(Protocol):
    events: list[dict[str, Any]]

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any: ...

    async def transaction(self, actions: list[tuple[str, dict[str, Any]]]) -> Any: ...

    async def wait_event(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60
    ) -> dict[str, Any]: ...


class LibClient:
    """The qemu.qmp library's QMPClient; events collected by support.EventLog."""

    def __init__(self, client: QMPClient, log: EventLog) -> None:
        self.client = client
        self.log = log
        self.events = log.events

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.client.execute(cmd, args)

    async def transaction(self, actions: list[tuple[str, dict[str, Any]]]) -> Any:
        return await self.execute(
            "transaction", {"actions": [{"type": t, "data": d} for t, d in actions]}
        )

    async def wait_event(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60
    ) -> dict[str, Any]:
        return await self.log.wait_for(pred, timeout)


# -- the workflow --------------------------------------------------------------------------------


def _io(target: str, fmt: str, cmds: list[str]) -> None:
    args: list[str] = ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    qemu_io(*args, target)


def _chain_map(path: Path) -> list[dict[str, Any]]:
    """Which layer of the chain topped by *path* holds each range (``depth``; 0 is *path*
    itself), and as data or zeroes. Host offsets are left out, and the ranges qemu-img splits
    only because their host clusters are not contiguous are joined."""
    out: list[dict[str, Any]] = []
    for e in json.loads(qemu_img("map", "--output=json", "-f", "qcow2", path).stdout):
        kind = {k: e[k] for k in ("depth", "zero", "data")}
        if out and {k: out[-1][k] for k in kind} == kind:
            out[-1]["length"] += e["length"]
        else:
            out.append({"start": e["start"], "length": e["length"], **kind})
    return out


def _build(d: Path) -> None:
    qcow2_image(d / "src.qcow2", SIZE, INITIAL)
    qcow2_image(d / "full.qcow2", SIZE)
    # the raw shadow: the initial contents, then every write the export gets
    qemu_img("convert", "-f", "qcow2", "-O", "raw", d / "src.qcow2", d / "shadow.raw")


async def _job_done(q: Client, job: str) -> dict[str, Any]:
    """Wait for *job* to go away; its BLOCK_JOB_COMPLETED data, which must carry no error."""
    await q.wait_event(
        lambda e: e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {"id": job, "status": "null"}
    )
    done = next(
        e["data"]
        for e in q.events
        if e["event"] == "BLOCK_JOB_COMPLETED" and e["data"]["device"] == job
    )
    assert "error" not in done, done
    return dict(done)


async def _bitmaps(q: Client, node: str) -> list[dict[str, Any]]:
    for n in await q.execute("query-named-block-nodes"):
        if n["node-name"] == node:
            return list(n.get("dirty-bitmaps", []))
    raise AssertionError(f"no node {node}")


async def _count(q: Client, res: dict[str, Any]) -> int:
    """bitmap0's dirty byte count now; the whole entry goes into *res* for the comparison."""
    (bm,) = await _bitmaps(q, "src")
    assert bm["name"] == "bitmap0" and bm["recording"] and not bm["busy"], bm
    res["bitmaps"].append(bm)
    res["counts"].append(bm["count"])
    return int(bm["count"])


async def workflow(q: Client, d: Path) -> dict[str, Any]:
    nbd = d / "nbd.sock"
    uri = f"nbd+unix:///src?socket={nbd}"
    res: dict[str, Any] = {"counts": [], "bitmaps": [], "done": []}

    async def nbd_writes(cmds: list[str]) -> None:
        await asyncio.to_thread(_io, uri, "raw", cmds)
        await asyncio.to_thread(_io, str(d / "shadow.raw"), "raw", cmds)

    async def snapshot(name: str) -> Path:
        """The export's contents now (no writer is active), read over NBD."""
        snap = d / f"{name}.raw"
        await asyncio.to_thread(qemu_img, "convert", "-f", "raw", "-O", "raw", uri, snap)
        assert compare(snap, d / "shadow.raw"), f"{name}: the export lost or reordered writes"
        return snap

    async def chain_equals(top: str, snap: Path) -> bool:
        return await asyncio.to_thread(compare, d / top, snap, "qcow2", "raw")

    await q.execute("blockdev-add", qcow2_node("src", d / "src.qcow2"))
    await q.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}})
    await q.execute(
        "block-export-add", {"type": "nbd", "id": "exp", "node-name": "src", "writable": True}
    )
    res["bitmaps_before"] = await _bitmaps(q, "src")

    # 1. bitmap and full backup in one transaction
    await q.execute("blockdev-add", qcow2_node("full", d / "full.qcow2"))
    snap0 = await snapshot("snap0")
    await q.transaction(
        [
            ("block-dirty-bitmap-add", {"node": "src", "name": "bitmap0"}),
            (
                "blockdev-backup",
                {"job-id": "full", "device": "src", "target": "full", "sync": "full"},
            ),
        ]
    )
    res["done"].append(await _job_done(q, "full"))
    await _count(q, res)
    await q.execute("blockdev-del", {"node-name": "full"})
    assert await chain_equals("full.qcow2", snap0), "full backup differs from the image"

    # 2. writes over NBD
    await nbd_writes(WRITES_1)
    await _count(q, res)

    # 3a. first incremental: blockdev-backup into an image backed by the full backup
    await asyncio.to_thread(qcow2_image, d / "inc0.qcow2", SIZE, backing=d / "full.qcow2")
    await q.execute("blockdev-add", qcow2_node("inc0", d / "inc0.qcow2"))
    snap1 = await snapshot("snap1")
    await q.execute(
        "blockdev-backup",
        {
            "job-id": "inc0",
            "device": "src",
            "target": "inc0",
            "sync": "incremental",
            "bitmap": "bitmap0",
        },
    )
    res["done"].append(await _job_done(q, "inc0"))
    await _count(q, res)
    await q.execute("blockdev-del", {"node-name": "inc0"})
    assert await chain_equals("inc0.qcow2", snap1), "first incremental chain differs"

    # 3b. more writes, second incremental: drive-backup mode=existing
    await nbd_writes(WRITES_2)
    await _count(q, res)
    await asyncio.to_thread(qcow2_image, d / "inc1.qcow2", SIZE, backing=d / "inc0.qcow2")
    snap2 = await snapshot("snap2")
    await q.execute(
        "drive-backup",
        {
            "job-id": "inc1",
            "device": "src",
            "target": str(d / "inc1.qcow2"),
            "format": "qcow2",
            "mode": "existing",
            "sync": "incremental",
            "bitmap": "bitmap0",
        },
    )
    res["done"].append(await _job_done(q, "inc1"))
    await _count(q, res)
    assert await chain_equals("inc1.qcow2", snap2), "second incremental chain differs"

    # the older chains were not touched by the later backups
    assert await chain_equals("full.qcow2", snap0)
    assert await chain_equals("inc0.qcow2", snap1)

    await q.execute("block-export-del", {"id": "exp"})
    await q.wait_event(lambda e: e["event"] == "BLOCK_EXPORT_DELETED")
    await q.execute("nbd-server-stop")
    nodes = sorted(n["node-name"] for n in await q.execute("query-named-block-nodes"))
    res["nodes"] = [n for n in nodes if not n.startswith("#")]
    await q.execute("blockdev-del", {"node-name": "src"})
    res["maps"] = {name: _chain_map(d / f"{name}.qcow2") for name in ("full", "inc0", "inc1")}
    res["events"] = [{k: v for k, v in e.items() if k != "timestamp"} for e in q.events]
    assert all("timestamp" in e for e in q.events)
    for snap in (snap0, snap1, snap2):
        snap.unlink()
    return res


# -- running it on both daemons ------------------------------------------------------------------
def _check(results: dict[str, dict[str, Any]], dirs: dict[str, Path]) -> None:
    b, q = results["blockd"], results["qsd"]
    # the bitmap drops to 0 after each successful backup, and counts what was written between
    assert b["counts"][0] == b["counts"][2] == b["counts"][4] == 0, b["counts"]
    assert b["counts"][1] > 0 and b["counts"][3] > 0, b["counts"]
    assert b["bitmaps_before"] == []
    assert [d["len"] for d in b["done"]] == [SIZE, b["counts"][1], b["counts"][3]]
    for key in ("counts", "bitmaps", "done", "nodes", "maps", "bitmaps_before"):
        assert b[key] == q[key], f"{key}: blockd {b[key]}\n   qsd {q[key]}"
    assert b["events"] == q["events"], (
        "\n".join(f"{x}\n  {y}" for x, y in zip(b["events"], q["events"], strict=False) if x != y)
        or f"blockd {len(b['events'])} events, qsd {len(q['events'])}"
    )
    names = [e["event"] for e in b["events"]]
    assert names.count("BLOCK_JOB_COMPLETED") == 3 and "BLOCK_JOB_ERROR" not in names
    for name in ("full", "inc0", "inc1"):
        assert compare(
            dirs["blockd"] / f"{name}.qcow2", dirs["qsd"] / f"{name}.qcow2", "qcow2", "qcow2"
        ), f"{name}: blockd's backup chain differs from QSD's"


def _dirs(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        d.mkdir()
        _build(d)
        out[kind] = d
    return out


def _start(kind: str, d: Path) -> Any:
    return start_blockd(d) if kind == "blockd" else start_qsd(d)


async def test_workflow_typed_into_qmp_shell(tmp_path: Path) -> None:
    dirs = _dirs(tmp_path)
    results: dict[str, dict[str, Any]] = {}
    for kind, d in dirs.items():
        daemon = _start(kind, d)
        shell = ShellClient(daemon.sock, d)
        try:
            results[kind] = await workflow(shell, d)
        finally:
            shell.close()
            (d / "transcript.txt").write_text(shell.transcript)
            rc = daemon.stop()
        assert rc == 0, daemon.log_text()[-3000:]
        # what the user saw: the transaction typed over several lines, replies as JSON
        t = shell.transcript
        assert "(QEMU) transaction(\nTRANS> block-dirty-bitmap-add node=src name=bitmap0\n" in t
        assert "TRANS> blockdev-backup job-id=full device=src target=full sync=full\n" in t
        assert "TRANS> )\n{\n" in t
        assert "(QEMU) drive-backup job-id=inc1 device=src target=" in t
        assert '"error"' not in t and "Error while parsing" not in t
    _check(results, dirs)


async def test_workflow_through_qemu_qmp(tmp_path: Path) -> None:
    dirs = _dirs(tmp_path)
    results: dict[str, dict[str, Any]] = {}
    for kind, d in dirs.items():
        daemon = _start(kind, d)
        try:
            async with connect(daemon.sock) as (client, log):
                results[kind] = await workflow(LibClient(client, log), d)
        finally:
            rc = daemon.stop()
        assert rc == 0, daemon.log_text()[-3000:]
    _check(results, dirs)
