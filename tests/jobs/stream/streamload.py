"""A guest for stream tests: NBD clients that keep writing and reading back the disk while a
stream job copies the chain into it, each read checked against what the disk must hold at
that moment (the chain's data, overwritten by the guest's own writes). A stale byte (data the
job copied up over a newer guest write) or a lost write is caught on the read that sees it.

The disk is cut into 4 KiB blocks dealt round-robin to the clients ("lanes"): each lane
writes and reads only its own blocks, one request at a time, so it knows exactly what every
one of its blocks must read, while sixteen lanes share every 64 KiB cluster the job copies.
Used by tests/jobs/stream/test_stream_load.py (small disks, many seeds) and by
scripts/stream_guest.py (1 GiB).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient

from blockd.nbd.client import NbdClient

BLOCK = 4096
MiB = 1024 * 1024


@dataclass
class Guest:
    """What the disk must read (*shadow*) and what the lanes saw."""

    shadow: bytearray
    lanes: int = 8
    ops: int = 0
    written: int = 0
    checked: int = 0
    errors: list[str] = field(default_factory=list)

    async def lane(self, client: NbdClient, lane: int, rng: random.Random, stop: Any) -> None:
        nblocks = len(self.shadow) // BLOCK
        while not stop.is_set() and not self.errors:
            blk = rng.randrange(lane, nblocks, self.lanes)
            base = blk * BLOCK
            r = rng.random()
            if r < 0.4:
                off = base + rng.randrange(0, BLOCK)
                n = rng.randint(1, base + BLOCK - off)
                data = rng.randbytes(n)
                await client.write(off, data)
                self.shadow[off : off + n] = data
                self.written += n
            elif r < 0.5:
                await client.write_zeroes(base, BLOCK)
                self.shadow[base : base + BLOCK] = bytes(BLOCK)
                self.written += BLOCK
            else:
                got = bytes(await client.read(base, BLOCK))
                want = bytes(self.shadow[base : base + BLOCK])
                self.checked += 1
                if got != want:
                    at = next(i for i in range(BLOCK) if got[i] != want[i])
                    self.errors.append(
                        f"lane {lane}: byte {base + at} reads {got[at]:#x}, must be {want[at]:#x}"
                    )
            self.ops += 1

    async def check_all(self, client: NbdClient) -> None:
        """Read the whole disk and compare it with what it must hold."""
        step = 4 * MiB
        for off in range(0, len(self.shadow), step):
            n = min(step, len(self.shadow) - off)
            got = bytes(await client.read(off, n))
            if got != bytes(self.shadow[off : off + n]):
                at = next(i for i in range(n) if got[i] != self.shadow[off + i])
                self.errors.append(f"final read: byte {off + at} differs")
                return


def build_template(d: Path, size: int, seed: int) -> None:
    """base <- mid <- top, qcow2 with relative backing names (so copies of the three files
    form their own chain): seeded random data in every layer, overlapping, some unaligned,
    some zeroed over older data."""
    from support import qemu_img, qemu_io

    rng = random.Random(seed)
    prev = None
    for name in ("base", "mid", "top"):
        args = ["create", "-q", "-f", "qcow2"]
        if prev is not None:
            args += ["-b", prev, "-F", "qcow2"]
        qemu_img(*args, d / f"{name}.qcow2", str(size))
        cmds: list[str] = []
        extents = max(12, size // (8 * MiB))  # a quarter to a half of big disks
        for _ in range(extents if name != "top" else extents // 2):
            off = rng.randrange(0, size - 1)
            n = min(rng.choice([4096, 65536, 300_001, MiB, 2 * MiB, 4 * MiB]), size - off)
            if rng.random() < 0.15:
                off, n = off - off % 512, max(512, n - n % 512)
                cmds += ["-c", f"write -z {off} {min(n, size - off)}"]
            else:
                cmds += ["-c", f"write -P {rng.randrange(1, 255)} {off} {n}"]
        qemu_io("-f", "qcow2", *cmds, d / f"{name}.qcow2")
        prev = f"{name}.qcow2"


def chain_copy(template: Path, d: Path) -> None:
    d.mkdir()
    for name in ("base", "mid", "top"):
        shutil.copy(template / f"{name}.qcow2", d / f"{name}.qcow2")


async def add_chain(qmp: QMPClient, d: Path, tag: str) -> None:
    below = None
    for name in ("base", "mid", "top"):
        opts: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": f"{name}{tag}",
            "file": {"driver": "file", "filename": str(d / f"{name}.qcow2")},
        }
        if below is not None:
            opts["backing"] = below
        await qmp.execute("blockdev-add", opts)
        below = f"{name}{tag}"


async def job_end(events: Any, job: str, timeout: float = 120) -> dict[str, Any]:
    """The job's BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED."""
    ev: dict[str, Any] = await events.wait_for(
        lambda e: (
            e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
            and e["data"]["device"] == job
        ),
        timeout,
    )
    await events.wait_job_status(job, "null", timeout)
    return ev


@dataclass
class SeedResult:
    seed: int
    event: str
    ops: int
    written: int
    checked: int
    seconds: float
    errors: list[str]


async def run_seed(
    qmp: QMPClient,
    events: Any,
    d: Path,
    nbd_sock: Path,
    seed: int,
    shadow: bytes,
    *,
    speed: int,
    cancel: bool,
    cancel_within: float = 0.15,
    lanes: int = 8,
    base: str | None = "random",
) -> SeedResult:
    """One stream of the chain in *d* (already added with tag ``-{seed}``, top exported as
    ``s{seed}``) under the guest; optionally cancelled at a random moment. *base*: how far
    down it copies, ``base-node``, ``bottom`` or None (the whole chain); by default chosen
    by the seed."""
    rng = random.Random(seed)
    tag, job = f"-{seed}", f"j{seed}"
    guest = Guest(bytearray(shadow), lanes)
    clients = [
        await NbdClient.connect(("unix", str(nbd_sock)), f"s{seed}") for _ in range(lanes + 1)
    ]
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(guest.lane(c, i, random.Random(seed * 100 + i), stop))
        for i, c in enumerate(clients[:lanes])
    ]
    args: dict[str, Any] = {"job-id": job, "device": f"top{tag}", "speed": speed}
    which = rng.choice(["base-node", "bottom", None]) if base == "random" else base
    if which == "base-node":
        args["base-node"] = f"base{tag}"
    elif which == "bottom":
        args["bottom"] = f"mid{tag}"
    t0 = time.monotonic()
    try:
        await asyncio.sleep(0.02)  # the guest is busy before the job starts
        await qmp.execute("block-stream", args)
        if cancel:
            await asyncio.sleep(rng.uniform(0, cancel_within))
            try:
                await qmp.execute("block-job-cancel", {"device": job})
            except ExecuteError:
                pass  # it finished first
        ev = await job_end(events, job)
        await asyncio.sleep(0.05)  # a little guest I/O on the new chain too
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    seconds = time.monotonic() - t0
    if not guest.errors:
        await guest.check_all(clients[-1])
    for c in clients:
        await c.disconnect()
    (d / "guest.raw").write_bytes(guest.shadow)
    return SeedResult(
        seed, ev["event"], guest.ops, guest.written, guest.checked, seconds, guest.errors
    )
