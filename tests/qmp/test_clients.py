"""Real clients against the real daemon: qemu.qmp, qmp-shell, many clients at once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from support import ROOT, Daemon, connect, qemu_img

QMP_SHELL = str(Path(sys.executable).parent / "qmp-shell")


async def _wait_job(client: QMPClient, job: str, status: str = "concluded") -> dict[str, Any]:
    for _ in range(500):
        for j in await client.execute("query-jobs"):
            if j["id"] == job and j["status"] == status:
                return dict(j)
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job} never reached {status}")


async def test_qemu_qmp_runs_every_foundation_command(blockd: Daemon, tmp_path: Path) -> None:
    img = tmp_path / "new.img"
    async with connect(blockd.sock) as (c, events):
        v = await c.execute("query-version")
        assert v["qemu"]["major"] == 7 and v["package"].startswith("blockd")
        names = {x["name"] for x in await c.execute("query-commands")}
        for cmd in [
            "blockdev-add",
            "blockdev-del",
            "query-named-block-nodes",
            "blockdev-create",
            "query-jobs",
            "query-block-jobs",
            "job-pause",
            "job-resume",
            "job-cancel",
            "job-complete",
            "job-finalize",
            "job-dismiss",
            "quit",
            "query-qmp-schema",
        ]:
            assert cmd in names
        schema = await c.execute("query-qmp-schema")
        assert {e["name"] for e in schema if e["meta-type"] == "command"} == names
        await c.execute(
            "blockdev-create",
            {"job-id": "c1", "options": {"driver": "file", "filename": str(img), "size": 4 << 20}},
        )
        await events.wait_job_status("c1", "concluded")
        assert await c.execute("query-block-jobs") == []
        for verb in ["job-pause", "job-complete", "job-finalize", "job-cancel"]:
            with pytest.raises(ExecuteError) as ei:
                await c.execute(verb, {"id": "c1"})
            assert ei.value.error.error.desc.startswith(
                "Job 'c1' in state 'concluded' cannot accept"
            )
        with pytest.raises(ExecuteError) as ei:
            await c.execute("job-resume", {"id": "c1"})
        assert ei.value.error.error.desc == "Can't resume a job that was not paused"
        await c.execute("job-dismiss", {"id": "c1"})
        assert events.names() == [
            "J:c1:created",
            "J:c1:running",
            "J:c1:waiting",
            "J:c1:pending",
            "J:c1:concluded",
            "J:c1:null",
        ]
        await c.execute("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(img)})
        await c.execute("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0"})
        nodes = await c.execute("query-named-block-nodes")
        assert [n["node-name"] for n in nodes] == ["r0", "f0"]
        assert nodes[0]["image"]["virtual-size"] == 4 << 20
        flat = await c.execute("query-named-block-nodes", {"flat": True})
        assert all(n["backing_file_depth"] == 0 for n in flat)
        with pytest.raises(ExecuteError) as ei:
            await c.execute("blockdev-del", {"node-name": "f0"})
        assert ei.value.error.error.desc == "Block device f0 is in use"
        await c.execute("blockdev-del", {"node-name": "r0"})
        await c.execute("blockdev-del", {"node-name": "f0"})
        assert await c.execute("query-named-block-nodes") == []
        await c.execute("quit")
    assert blockd.proc.wait(timeout=10) == 0
    assert not blockd.sock.exists()
    assert qemu_img("info", "--output=json", img).stdout
    assert json.loads(qemu_img("info", "--output=json", img).stdout)["virtual-size"] == 4 << 20


def _qmp_shell(sock: Path, lines: list[str]) -> str:
    res = subprocess.run(
        [QMP_SHELL, "-p", str(sock)],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


async def test_qmp_shell_piped(blockd: Daemon, tmp_path: Path) -> None:
    img = tmp_path / "shell.img"
    out = await asyncio.to_thread(
        _qmp_shell,
        blockd.sock,
        [
            "blockdev-add driver=null-co node-name=n0 size=1048576",
            "query-named-block-nodes",
            "blockdev-create job-id=c1 options="
            + json.dumps(
                {"driver": "file", "filename": str(img), "size": 1048576}, separators=(",", ":")
            ),
        ],
    )
    assert '"node-name": "n0"' in out
    assert "error" not in out.lower()
    assert out.count('"return"') == 3
    async with connect(blockd.sock) as (c, _):
        await _wait_job(c, "c1")
    out = await asyncio.to_thread(
        _qmp_shell, blockd.sock, ["query-jobs", "job-dismiss id=c1", "query-jobs"]
    )
    assert '"status": "concluded"' in out
    assert out.rstrip().endswith('"return": []\n}\n(QEMU)') or '"return": []' in out
    assert img.stat().st_size == 1048576


async def test_fifty_clients_hundred_commands_each(blockd: Daemon, tmp_path: Path) -> None:
    clients: list[tuple[QMPClient, Any]] = []
    ctxs = [connect(blockd.sock) for _ in range(50)]
    for cm in ctxs:
        clients.append(await cm.__aenter__())
    try:

        async def work(i: int, c: QMPClient) -> None:
            for k in range(100):
                m = k % 4
                if m == 0:
                    assert (await c.execute("query-version"))["qemu"]["major"] == 7
                elif m == 1:
                    await c.execute("blockdev-add", {"driver": "null-co", "node-name": f"n{i}x{k}"})
                elif m == 2:
                    nodes = await c.execute("query-named-block-nodes", {"flat": True})
                    assert f"n{i}x{k - 1}" in {n["node-name"] for n in nodes}
                else:
                    await c.execute("blockdev-del", {"node-name": f"n{i}x{k - 2}"})

        await asyncio.gather(*(work(i, c) for i, (c, _) in enumerate(clients)))
        c0 = clients[0][0]
        assert await c0.execute("query-named-block-nodes") == []
        await c0.execute(
            "blockdev-create",
            {
                "job-id": "ev",
                "options": {"driver": "file", "filename": str(tmp_path / "e.img"), "size": 512},
            },
        )
        for _, events in clients:
            await events.wait_job_status("ev", "concluded")
    finally:
        for cm in ctxs:
            await cm.__aexit__(None, None, None)


async def test_disconnect_mid_command_harms_nobody(blockd: Daemon, tmp_path: Path) -> None:
    from rawclient import RawQmp

    for i in range(20):
        r = RawQmp(blockd.sock)
        r.negotiate()
        opts = {
            "driver": "file",
            "filename": str(tmp_path / f"d{i}.img"),
            "size": 1 << 20,
            "preallocation": "full",
        }
        r.send({"execute": "blockdev-create", "arguments": {"job-id": f"j{i}", "options": opts}})
        r.close()  # gone before the reply (and with events possibly unread)
    async with connect(blockd.sock) as (c, _):
        await asyncio.sleep(0.5)
        jobs = await c.execute("query-jobs")
        assert len(jobs) >= 10  # a client that vanishes with unread data may lose its last send
        for j in jobs:
            await _wait_job(c, j["id"])
            await c.execute("job-dismiss", {"id": j["id"]})
        assert await c.execute("query-jobs") == []
    assert "Traceback" not in blockd.log_text()


def test_oversized_message_gets_error_and_connection_survives(blockd: Daemon) -> None:
    from rawclient import RawQmp

    r = RawQmp(blockd.sock, timeout=30)
    r.negotiate()
    big = '{"execute": "query-version", "id": "' + "x" * (17 * 1024 * 1024) + '"}'
    r.send(big)
    err = r.reply()
    assert err["error"]["class"] == "GenericError" and "exceeds" in err["error"]["desc"]
    assert r.cmd("query-version", id="after")["id"] == "after"
    r.close()


def test_cli_blockdev_option(blockd_factory: Any) -> None:
    from rawclient import RawQmp

    d = blockd_factory(
        "--blockdev",
        json.dumps({"driver": "null-co", "node-name": "boot0"}),
        "--blockdev",
        "driver=raw,node-name=boot1,file.driver=null-co,file.size=1048576,read-only=on",
    )
    r = RawQmp(d.sock)
    r.negotiate()
    nodes = r.cmd("query-named-block-nodes")["return"]
    assert [(n["node-name"], n["ro"]) for n in nodes if not n["node-name"].startswith("#")] == [
        ("boot1", True),
        ("boot0", False),
    ]
    assert nodes[0]["image"]["virtual-size"] == 1048576
    r.close()


def test_bad_cli_blockdev_exits_1(tmp_path: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "blockd",
            "--socket",
            str(tmp_path / "s"),
            "--blockdev",
            json.dumps({"driver": "file", "node-name": "x", "filename": str(tmp_path / "none")}),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert res.returncode == 1
    assert "Could not open" in res.stderr
    assert not (tmp_path / "s").exists()


async def test_inline_file_child_inherits_discard(blockd: Daemon, tmp_path: Path) -> None:
    """discard=unmap on a format node reaches its inline file child, as in QEMU, so a discard
    through the raw node punches a hole in the file."""
    img = tmp_path / "d.raw"
    qemu_img("create", "-f", "raw", img, "4M")
    with open(img, "r+b") as f:
        f.write(b"\x55" * (4 << 20))
    async with connect(blockd.sock) as (c, _):
        await c.execute(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": "r",
                "discard": "unmap",
                "file": {"driver": "file", "filename": str(img)},
            },
        )
        nbd = tmp_path / "nbd.sock"
        await c.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}})
        await c.execute(
            "block-export-add", {"type": "nbd", "id": "e", "node-name": "r", "writable": True}
        )
        await asyncio.to_thread(
            qemu_img, "map", "--output=json", "-f", "raw", f"nbd+unix:///r?socket={nbd}"
        )
        from support import qemu_io

        await asyncio.to_thread(
            qemu_io, "-f", "raw", "-c", "discard 0 1M", f"nbd+unix:///r?socket={nbd}"
        )
        await c.execute("block-export-del", {"id": "e"})
    assert img.stat().st_blocks * 512 <= 3 << 20
