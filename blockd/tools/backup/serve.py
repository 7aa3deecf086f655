"""``serve``: instant restore. The daemon opens a point's chain read-only and exports each of
its disks over NBD, so a VM (or ``qemu-img``, ``nbdcopy``...) can use the backup before, or
instead of, copying it back.

If ``--nbd PATH`` is given and the daemon runs no NBD server yet, one is started on that Unix
socket and stopped again at the end; if one runs already, the exports are added to it. The
exports are read-only, so no bitmap or layer changes. On ctrl-c or SIGTERM the exports are
removed (``hard``: connected clients are dropped) and the chain is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from blockd.tools.backup import lock
from blockd.tools.backup.errors import QmpFailed, ToolError
from blockd.tools.backup.manifest import BackupDir
from blockd.tools.backup.progress import Reporter
from blockd.tools.backup.session import Monitor


def export_name(disk: str, point: int) -> str:
    return f"{disk}-p{point}"


async def serve(
    directory: Path,
    number: int,
    socket: str,
    nbd: Path | None,
    rep: Reporter,
    busy_timeout: float = 60.0,
) -> None:
    bdir = BackupDir.open(directory)
    with lock.readers(bdir.path):
        chain, point = bdir.find_point(number)
        mon = Monitor(socket, busy_timeout, rep.note)
        nodes: list[str] = []
        started_server = False
        try:
            async with mon.session() as s:
                if nbd is not None:
                    try:
                        await s.execute(
                            "nbd-server-start",
                            {"addr": {"type": "unix", "data": {"path": str(nbd)}}},
                        )
                        started_server = True
                    except QmpFailed as exc:
                        if "already running" not in exc.desc:
                            raise
                        rep.note(f"the daemon runs an NBD server already; assuming it is at {nbd}")
                uris = []
                for i, (disk, dp) in enumerate(point.disks.items()):
                    node = f"{bdir.prefix}s{point.point}-{i}"
                    await s.execute(
                        "blockdev-add",
                        {
                            "driver": "qcow2",
                            "node-name": node,
                            "read-only": True,
                            "file": {"driver": "file", "filename": str(chain.path / dp.layer)},
                        },
                    )
                    nodes.append(node)
                    name = export_name(disk, point.point)
                    try:
                        await s.execute(
                            "block-export-add",
                            {"type": "nbd", "id": node, "node-name": node, "name": name},
                        )
                    except QmpFailed as exc:
                        if "not running" in exc.desc:
                            raise ToolError(
                                "the daemon runs no NBD server; give --nbd PATH to start one"
                            ) from None
                        raise
                    if nbd is not None:
                        uris.append(f"nbd+unix:///{name}?socket={nbd}")
                    else:
                        uris.append(f"export '{name}' on the daemon's NBD server")
            for disk, uri in zip(point.disks, uris, strict=True):
                rep.result(f"serving {disk} at point {point.point}: {uri}", disk=disk, uri=uri)
            rep.note("serving read-only until interrupted (ctrl-c)")
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass
        finally:
            await _stop(mon, nodes, started_server)
            rep.note(f"stopped serving point {point.point}")


async def _stop(mon: Monitor, nodes: list[str], stop_server: bool) -> None:
    """Remove the exports, close the chain, stop the server we started. An export removed in
    ``hard`` mode goes away a moment after the reply, so the node is retried for a while."""
    async with mon.session() as s:
        for node in nodes:
            with contextlib.suppress(QmpFailed):
                await s.execute("block-export-del", {"id": node, "mode": "hard"})
    deadline = time.monotonic() + 10
    left = list(nodes)
    while left:
        async with mon.session() as s:
            exports = {e["id"] for e in await s.execute("query-block-exports")}
            for node in list(left):
                if node in exports:
                    continue
                try:
                    await s.execute("blockdev-del", {"node-name": node})
                    left.remove(node)
                except QmpFailed as exc:
                    if exc.missing:
                        left.remove(node)
                    elif time.monotonic() > deadline:
                        raise ToolError(f"cannot close {node}: {exc.desc}") from None
        if left:
            if time.monotonic() > deadline:
                raise ToolError(f"the exports of {', '.join(left)} did not go away")
            await asyncio.sleep(0.05)
    if stop_server:
        with contextlib.suppress(QmpFailed):
            await mon.execute("nbd-server-stop")
