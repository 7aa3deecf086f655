"""Mirror and active commit under a guest that never stops writing: NBD clients rewrite
random ranges of the exported disk from before the job starts until after it completed. Each
job must reach READY, complete, and leave the guest on a disk that holds exactly what the guest
wrote (a shadow buffer got the same writes), whatever the seed picks: granularity, buf-size,
copy mode, where and when the writes land. Every image passes ``qemu-img check``."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

from guestload import Guest, add_qcow2, daemon_with_nbd, drop_export_and_nodes, first_difference
from qemu.qmp import QMPClient
from support import EventLog, qemu_img

MiB = 1024 * 1024
SIZE = 2 * MiB
SEEDS = range(20)


def _image(path: Path, data: bytes | None, backing: Path | None = None) -> None:
    """A qcow2 image holding *data* (sparse where it is zero), or an empty overlay."""
    if data is None:
        args = ["create", "-f", "qcow2"]
        if backing is not None:
            args += ["-b", str(backing), "-F", "qcow2"]
        qemu_img(*args, path, str(SIZE))
        return
    raw = path.with_suffix(".raw")
    raw.write_bytes(data)
    qemu_img("convert", "-O", "qcow2", "-f", "raw", raw, path)
    raw.unlink()


def _initial(rng: random.Random) -> bytes:
    buf = bytearray(SIZE)
    for _ in range(6):
        off = rng.randrange(SIZE)
        n = min(rng.randrange(1, 512 * 1024), SIZE - off)
        buf[off : off + n] = rng.randbytes(n)
    return bytes(buf)


async def _wait(log: EventLog, job: str, status: str, since: int) -> None:
    def hit(e: dict[str, Any]) -> bool:
        return e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {"id": job, "status": status}

    await log.wait_for(lambda e: e in log.events[since:] and hit(e), timeout=60)


async def _run_seed(qmp: QMPClient, log: EventLog, d: Path, seed: int, commit: bool) -> None:
    rng = random.Random(seed)
    initial = _initial(rng)
    src, dst = f"s{seed}", f"t{seed}"
    if commit:
        # the guest's disk is the active layer over a base holding the initial data
        _image(d / f"{dst}.qcow2", initial)
        _image(d / f"{src}.qcow2", None, backing=d / f"{dst}.qcow2")
        await add_qcow2(qmp, d, dst)
        await add_qcow2(qmp, d, src, backing=dst)
    else:
        _image(d / f"{src}.qcow2", initial)
        _image(d / f"{dst}.qcow2", None)
        await add_qcow2(qmp, d, src)
        await add_qcow2(qmp, d, dst)
    await qmp.execute(
        "block-export-add",
        {"type": "nbd", "id": f"e{seed}", "node-name": src, "name": f"e{seed}", "writable": True},
    )
    guest = Guest(d / "nbd.sock", f"e{seed}", initial, seed)
    await guest.start()
    await asyncio.sleep(rng.uniform(0, 0.05))
    job = f"j{seed}"
    since = len(log.events)
    if commit:
        await qmp.execute("block-commit", {"job-id": job, "device": src})
    else:
        args: dict[str, Any] = {"job-id": job, "device": src, "target": dst, "sync": "full"}
        args["granularity"] = rng.choice([4096, 65536, 1 << 20])
        args["buf-size"] = rng.choice([256 * 1024, 4 * MiB, 16 * MiB])
        args["copy-mode"] = rng.choice(["background", "write-blocking"])
        await qmp.execute("blockdev-mirror", args)
    await _wait(log, job, "ready", since)
    await asyncio.sleep(rng.uniform(0, 0.1))
    await qmp.execute("block-job-complete", {"device": job})
    await _wait(log, job, "null", since)
    completed = [e for e in log.events[since:] if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert completed and "error" not in completed[-1]["data"], completed
    await asyncio.sleep(rng.uniform(0, 0.05))  # the guest goes on writing, now to dst
    await guest.finish()
    exports = await qmp.execute("query-block-exports")
    assert [e["node-name"] for e in exports] == [dst]
    seen = await guest.read_all()
    diff = first_difference(seen, bytes(guest.shadow))
    assert diff < 0, f"seed {seed}: the guest's disk differs at {diff} after {guest.ops} writes"
    await drop_export_and_nodes(qmp, log, d, f"e{seed}", since, src, dst)


async def _seeds(tmp_path: Path, commit: bool) -> None:
    async with daemon_with_nbd(tmp_path) as (qmp, log):
        for seed in SEEDS:
            await _run_seed(qmp, log, tmp_path, seed, commit)


async def test_mirror_under_guest_writes(tmp_path: Path) -> None:
    await _seeds(tmp_path, commit=False)


async def test_active_commit_under_guest_writes(tmp_path: Path) -> None:
    await _seeds(tmp_path, commit=True)
