"""``kill -9`` of blockd in the middle of an intermediate and of an active commit, with a
guest writing until just before (and flushing, so what it wrote must survive): afterwards
every image passes ``qemu-img check`` (no corruption; leaked clusters are allowed, as after a
crash of QEMU) and the chain reads exactly what the guest's disk held when the daemon died."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from pathlib import Path

import pytest
from diffsupport import MiB
from guestload import Guest, first_difference
from jobdiff import chain
from support import check_image, connect, qemu_img, start_blockd

SIZE = 16 * MiB


def _read_chain(path: Path, dest: Path) -> bytes:
    qemu_img("convert", "-U", "-O", "raw", path, dest)
    return dest.read_bytes()


@pytest.mark.parametrize("active", [False, True], ids=["intermediate", "active"])
@pytest.mark.parametrize(
    "seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
)
async def test_kill_during_commit(tmp_path: Path, active: bool, seed: int) -> None:
    rng = random.Random(seed)
    chain(tmp_path, SIZE)
    initial = _read_chain(tmp_path / "top.qcow2", tmp_path / "initial.raw")
    daemon = start_blockd(tmp_path)
    guest: Guest | None = None
    try:
        async with connect(daemon.sock) as (qmp, _log):
            for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
                opts = {
                    "driver": "qcow2",
                    "node-name": name,
                    "file": {"driver": "file", "filename": str(tmp_path / f"{name}.qcow2")},
                }
                if backing:
                    opts["backing"] = backing
                await qmp.execute("blockdev-add", opts)
            sock = tmp_path / "nbd.sock"
            await qmp.execute(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}
            )
            await qmp.execute(
                "block-export-add",
                {"type": "nbd", "id": "e", "node-name": "top", "name": "e", "writable": True},
            )
            guest = Guest(sock, "e", initial, seed, writers=1)
            await guest.start()
            args = {"job-id": "c", "device": "top", "speed": 4 * MiB}
            if not active:
                args["top-node"] = "mid"
            await qmp.execute("block-commit", args)
            await asyncio.sleep(rng.uniform(0.05, 0.6))
            await guest.finish()
            await guest.flush()  # only what the guest flushed must survive a crash
            (job,) = await qmp.execute("query-jobs")
            assert job["status"] == "running" and job["current-progress"] > 0, job
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
    assert guest is not None
    for name in ("base", "mid", "top"):
        res = check_image(tmp_path / f"{name}.qcow2")
        assert res["rc"] in (0, 3), (name, json.dumps(res))
        assert not res.get("corruptions"), (name, res)
    seen = _read_chain(tmp_path / "top.qcow2", tmp_path / "after.raw")
    diff = first_difference(seen, bytes(guest.shadow))
    assert diff < 0, f"the chain differs at {diff} after the kill"
