"""A guest for the load tests: NBD clients rewriting random ranges of an export without
pause, while a shadow buffer receives the same writes, so that the disk the guest ends up on can
be compared byte for byte with what it wrote.

Writers work on disjoint stripes (NBD orders nothing between requests in flight), and each
waits for its write before the next, so the shadow is exact whatever the server does in
between (pivots included)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from support import EventLog, check_image, connect, start_blockd

from blockd.nbd.client import NbdClient

STRIPE = 256 * 1024


class Guest:
    def __init__(
        self,
        sock: Path,
        export: str,
        initial: bytes,
        seed: int,
        writers: int = 2,
        pause: float = 0.0,
    ):
        self.address = ("unix", str(sock))
        self.export = export
        self.shadow = bytearray(initial)
        self.rng = random.Random(seed)
        self.writers = writers
        #: Seconds each writer waits between writes (0: as fast as it can).
        self.pause = pause
        self.stop = asyncio.Event()
        self.ops = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for i in range(self.writers):
            client = await NbdClient.connect(self.address, self.export)
            rng = random.Random(self.rng.random())
            self._tasks.append(asyncio.create_task(self._write(client, i, rng)))

    async def _write(self, client: NbdClient, lane: int, rng: random.Random) -> None:
        size = len(self.shadow)
        stripes = [s for s in range(0, size, STRIPE) if (s // STRIPE) % self.writers == lane]
        try:
            while not self.stop.is_set():
                base = rng.choice(stripes)
                off = base + rng.randrange(STRIPE)
                n = min(rng.randrange(1, 96 * 1024), base + STRIPE - off)
                if rng.random() < 0.15:
                    await client.write_zeroes(off, n)
                    data = bytes(n)
                else:
                    data = (
                        rng.randbytes(n) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * n
                    )
                    await client.write(off, data)
                self.shadow[off : off + n] = data
                self.ops += 1
                await asyncio.sleep(self.pause)
        finally:
            await client.disconnect()

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self._tasks)

    async def flush(self) -> None:
        """What the guest wrote is stable (a crash after this loses none of it)."""
        client = await NbdClient.connect(self.address, self.export)
        try:
            await client.flush()
        finally:
            await client.disconnect()

    async def read_all(self) -> bytes:
        client = await NbdClient.connect(self.address, self.export)
        try:
            out = bytearray()
            for pos in range(0, len(self.shadow), 4 * 1024 * 1024):
                out += await client.read(pos, min(4 * 1024 * 1024, len(self.shadow) - pos))
            return bytes(out)
        finally:
            await client.disconnect()


def first_difference(a: bytes, b: bytes) -> int:
    """Offset of the first differing byte, -1 when equal."""
    if a == b:
        return -1
    for pos in range(0, min(len(a), len(b)), 4096):
        if a[pos : pos + 4096] != b[pos : pos + 4096]:
            return pos + next(
                i for i, (x, y) in enumerate(zip(a[pos:], b[pos:], strict=False)) if x != y
            )
    return min(len(a), len(b))


@contextlib.asynccontextmanager
async def daemon_with_nbd(tmp: Path) -> AsyncIterator[tuple[QMPClient, EventLog]]:
    """blockd in *tmp* with its NBD server on ``tmp/nbd.sock``; must exit cleanly."""
    daemon = start_blockd(tmp)
    try:
        async with connect(daemon.sock) as (qmp, log):
            await qmp.execute(
                "nbd-server-start",
                {"addr": {"type": "unix", "data": {"path": str(tmp / "nbd.sock")}}},
            )
            yield qmp, log
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]


async def add_qcow2(qmp: QMPClient, d: Path, name: str, backing: str | None = None) -> None:
    opts: dict[str, Any] = {
        "driver": "qcow2",
        "node-name": name,
        "file": {"driver": "file", "filename": str(d / f"{name}.qcow2")},
    }
    if backing is not None:
        opts["backing"] = backing
    await qmp.execute("blockdev-add", opts)


async def drop_export_and_nodes(
    qmp: QMPClient, log: EventLog, d: Path, export: str, since: int, *nodes: str
) -> None:
    """Delete the export and the nodes; every image must then pass qemu-img check."""
    await qmp.execute("block-export-del", {"id": export})
    await log.wait_for(lambda e: e in log.events[since:] and e["event"] == "BLOCK_EXPORT_DELETED")
    for name in nodes:
        await qmp.execute("blockdev-del", {"node-name": name})
    for name in nodes:
        assert check_image(d / f"{name}.qcow2")["rc"] == 0
