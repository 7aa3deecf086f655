#!/usr/bin/env python3
"""Correctness at size, not speed: a mirror and an active commit of a 1 GiB image of random
data while NBD clients rewrite random ranges of the exported disk the whole time (the test
suite's tests/jobs/mirror/test_mirror_load.py at 1 GiB). Each job must reach READY, complete,
and leave the guest on a disk equal, byte for byte, to a shadow copy that got the same writes.

Usage: ``.venv/bin/python scripts/mirror_load.py [--size-mib 1024] [--dir DIR] [--seed N]``
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import ROOT, MiB, random_image, run, start, stop
from qemu.qmp import QMPClient

sys.path[:0] = [str(ROOT / "tests" / "jobs"), str(ROOT / "tests"), str(ROOT)]
from guestload import Guest, first_difference  # noqa: E402 - after the path it needs


async def _wait(qmp: QMPClient, job: str, status: str) -> None:
    async for ev in qmp.events:
        if ev["event"] == "JOB_STATUS_CHANGE" and ev["data"] == {"id": job, "status": status}:
            return


async def one(d: Path, data: Path, size: int, commit: bool, seed: int) -> str:
    src, dst = d / "src.qcow2", d / "dst.qcow2"
    for p in (src, dst):
        p.unlink(missing_ok=True)
    if commit:
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", data, dst)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", dst, "-F", "qcow2", src)
    else:
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", data, src)
        run("qemu-img", "create", "-q", "-f", "qcow2", dst, str(size))
    proc, sock = start("blockd", d)
    try:
        qmp = QMPClient("load")
        await qmp.connect(str(sock))
        await qmp.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "dst",
                "file": {"driver": "file", "filename": str(dst)},
            },
        )
        opts: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": "src",
            "file": {"driver": "file", "filename": str(src)},
        }
        if commit:
            opts["backing"] = "dst"
        await qmp.execute("blockdev-add", opts)
        await qmp.execute(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(d / "nbd.sock")}}}
        )
        await qmp.execute(
            "block-export-add",
            {"type": "nbd", "id": "e", "node-name": "src", "name": "e", "writable": True},
        )
        initial = await asyncio.to_thread(data.read_bytes)
        guest = Guest(d / "nbd.sock", "e", initial, seed, writers=4)
        await guest.start()
        t0 = time.perf_counter()
        if commit:
            await qmp.execute("block-commit", {"job-id": "j", "device": "src"})
        else:
            await qmp.execute(
                "blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst", "sync": "full"}
            )
        await _wait(qmp, "j", "ready")
        t_ready = time.perf_counter() - t0
        await asyncio.sleep(1)
        await qmp.execute("block-job-complete", {"device": "j"})
        await _wait(qmp, "j", "null")
        t_done = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        await guest.finish()
        exports = await qmp.execute("query-block-exports")
        assert [e["node-name"] for e in exports] == ["dst"], exports
        diff = first_difference(await guest.read_all(), bytes(guest.shadow))
        await qmp.execute("quit")
        await qmp.disconnect()
    finally:
        stop(proc, 30)
    what = "active commit" if commit else "mirror"
    verdict = "equal" if diff < 0 else f"DIFFERS at {diff}"
    return (
        f"{what:14} READY after {t_ready:6.2f} s, completed after {t_done:6.2f} s, "
        f"{guest.ops} guest writes: disk {verdict}"
    )


async def main_async(args: argparse.Namespace, d: Path) -> int:
    data = d / "data.raw"
    if not data.exists():
        random_image(data, args.size_mib)
    failed = 0
    for commit in (False, True):
        line = await one(d, data, args.size_mib * MiB, commit, args.seed)
        print(line, flush=True)
        failed += "DIFFERS" in line
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    d = args.dir or Path(tempfile.mkdtemp(prefix="mirror-load-"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(main_async(args, d))
    finally:
        if args.dir is None:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
