#!/usr/bin/env python3
"""What blockd-backup adds to an incremental backup, against the QMP sequence a user would
otherwise write by hand, both on the same qemu-storage-daemon.

A 16 GiB (--disk-gib) qcow2 disk is served by qemu-storage-daemon and exported over NBD. The
tool takes a full backup once (untimed); a second, hand-managed persistent bitmap is added
at the same moment. Then, each round:

1. --changed-mib MiB (default 1 GiB) of new data are written over NBD, in extents of
   --extent-kib KiB at random aligned places (both bitmaps record them);
2. the two incrementals copy the same dirty set, in alternating order:
   - tool: ``blockd-backup backup --socket ... --node disk0 --dir ...`` as a user runs it, timed
     from process start to exit (interpreter start-up, lock, manifest, the QMP transaction,
     polling, closing the target, hashing the new layer, fsync, manifest write);
   - hand: a Python script with qemu.qmp, timed the same way: ``qemu-img create`` of a target
     backed by the previous one, ``blockdev-add``, ``blockdev-backup sync=incremental``, wait
     for ``BLOCK_JOB_COMPLETED`` on its open connection, ``blockdev-del`` (which flushes): the
     minimum to get a closed incremental, with no checksum, manifest or safety net.

Before each timed run, both sides get the same start (benchlib.touch_memory, then sync).
Prints each round and the medians of two overheads: the plain wall-clock ratio (tool / hand
- 1), and what the tool adds around the copy (its time outside the copy less the script's,
over the script's total), which is robust to the copy's own run-to-run swings on a shared
machine. Disk use: about the disk's
data plus 2 x --changed-mib per round, in --dir (default a fresh temporary directory).

Usage: ``.venv/bin/python scripts/bench_backup_tool.py [--rounds 3] [--changed-mib 1024]
[--extent-kib 1024] [--disk-gib 16] [--dir DIR] [--keep]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import GiB, KiB, MiB, Qmp, export_nbd, node, run, start, stop, touch_memory

from blockd.nbd.client import NbdClient

TOOL = str(Path(sys.executable).parent / "blockd-backup")


async def write_changes(nbd: Path, total: int, extent: int, disk: int, seed: int) -> None:
    """*total* bytes in *extent*-sized writes at distinct random aligned offsets, 16 in flight."""
    rng = random.Random(seed)
    offsets = rng.sample(range(disk // extent), total // extent)
    base = bytearray(os.urandom(extent))
    client = await NbdClient.connect(("unix", str(nbd)), "disk0")
    gate = asyncio.Semaphore(16)

    async def one(i: int, off: int) -> None:
        async with gate:
            data = bytearray(base)
            data[:16] = f"{seed:8d}{i:8d}".encode()
            await client.write(off * extent, data)

    await asyncio.gather(*(one(i, off) for i, off in enumerate(offsets)))
    await client.flush()
    await client.disconnect()


#: The hand-written sequence, as a user would script it with qemu.qmp: run as its own Python
#: process, like the tool, so that both pay an interpreter start-up.
HAND = """
import asyncio, subprocess, sys, time
from qemu.qmp import QMPClient

sock, target, backing, size = sys.argv[1:5]

async def main():
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2",
                    target, size], check=True)
    qmp = QMPClient("hand")
    await qmp.connect(sock)
    with qmp.listener("BLOCK_JOB_COMPLETED") as events:
        await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "hand",
                          "file": {"driver": "file", "filename": target}})
        t0 = time.monotonic()
        await qmp.execute("blockdev-backup", {"job-id": "hand", "device": "disk0",
                          "target": "hand", "sync": "incremental", "bitmap": "hand"})
        async for ev in events:
            if "error" in ev["data"]:
                sys.exit(ev["data"]["error"])
            print(time.monotonic() - t0)  # the copy itself
            break
    await qmp.execute("blockdev-del", {"node-name": "hand"})
    await qmp.disconnect()

asyncio.run(main())
"""


def hand_incremental(
    sock: Path, work: Path, n: int, backing: str, size: int
) -> tuple[float, float]:
    """The hand-written sequence: (seconds in all, seconds of the copy)."""
    target = work / f"hand-{n}.qcow2"
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", HAND, str(sock), str(target), backing, str(size)],
        capture_output=True,
        text=True,
    )
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"hand incremental failed: {res.stderr}")
    return took, float(res.stdout)


def tool_backup(sock: Path, backups: Path) -> tuple[float, float, str]:
    """The tool: (seconds in all, seconds of the copy, its result line)."""
    t0 = time.perf_counter()
    res = subprocess.run(
        [TOOL, "backup", "--socket", str(sock), "--node", "disk0", "--dir", str(backups), "--json"],
        capture_output=True,
        text=True,
    )
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"blockd-backup failed: {res.stdout}{res.stderr}")
    events = [json.loads(line) for line in res.stdout.splitlines()]
    timings = next(e for e in events if e["event"] == "timings")
    result = next(e for e in events if e["event"] == "result")
    phases = ", ".join(f"{k} {v:.2f}" for k, v in timings.items() if k != "event")
    return took, float(timings["copy"]), f"{result['message']}; {phases}"


def added(row: dict[str, float]) -> float:
    """What the tool adds, as a share of the hand-written run: its time outside the copy less
    the script's time outside the copy. The copy is the daemon's work, the same for both, and
    on a shared machine it is what varies most from run to run."""
    return ((row["tool"] - row["tool-copy"]) - (row["hand"] - row["hand-copy"])) / row["hand"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--changed-mib", type=int, default=1024)
    ap.add_argument("--extent-kib", type=int, default=1024)
    ap.add_argument("--disk-gib", type=int, default=16)
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument(
        "--tool-daemon",
        choices=("qsd", "blockd"),
        default="qsd",
        help="the daemon the tool backs up from (default qsd, the same as the hand-written "
        "sequence; blockd: what a user who moves to blockd and the tool gets, against the "
        "script on qemu-storage-daemon, each daemon serving its own copy of the disk)",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-bbt-", dir=args.dir))
    size = args.disk_gib * GiB
    disk = work / "disk0.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, str(size))
    proc, sock = start("qsd", work)
    procs = [proc]
    tool_sock = sock
    nbds = [work / "nbd.sock"]
    rows = []
    try:
        q = Qmp(sock)
        q.cmd("blockdev-add", node("disk0", disk, "qcow2"))
        export_nbd(q, "disk0", nbds[0])
        q.close()
        # the data the disk holds before the measured rounds, then both chains start
        asyncio.run(write_changes(nbds[0], 2 * GiB, 4 * MiB, size, seed=0))
        if args.tool_daemon == "blockd":
            # blockd serves its own copy, and every round's writes go to both disks
            own = work / "disk0-blockd.qcow2"
            run("cp", "--sparse=always", disk, own)
            proc, tool_sock = start("blockd", work)
            procs.append(proc)
            q = Qmp(tool_sock)
            q.cmd("blockdev-add", node("disk0", own, "qcow2"))
            nbds.append(work / "nbd-blockd.sock")
            export_nbd(q, "disk0", nbds[1])
            q.close()
        backups = work / "backups"
        # untimed: the tool's full backup; the hand chain's base and bitmap at the same moment
        run(TOOL, "backup", "--socket", tool_sock, "--node", "disk0", "--dir", backups)
        q = Qmp(sock)
        q.cmd("block-dirty-bitmap-add", {"node": "disk0", "name": "hand", "persistent": True})
        q.close()
        if args.tool_daemon == "blockd":
            # the script's chain needs only a base of the right size: its incrementals copy whole
            # clusters and never read the backing file
            run("qemu-img", "create", "-q", "-f", "qcow2", work / "hand-0.qcow2", str(size))
        else:
            shutil.copy(next(backups.glob("chain-*/disk0.0001.qcow2")), work / "hand-0.qcow2")
        for n in range(1, args.rounds + 1):
            t = time.perf_counter()
            for nbd in nbds:
                asyncio.run(
                    write_changes(nbd, args.changed_mib * MiB, args.extent_kib * KiB, size, n)
                )
            print(f"round {n}: wrote {args.changed_mib} MiB in {time.perf_counter() - t:.1f} s")
            order = ["tool", "hand"] if n % 2 else ["hand", "tool"]
            row: dict[str, float] = {}
            for who in order:
                # the same start for both: guest memory touched, nothing dirty in the cache
                touch_memory(work)
                os.sync()
                if who == "tool":
                    row["tool"], row["tool-copy"], line = tool_backup(tool_sock, backups)
                    print(f"  tool {row['tool']:6.2f} s, copy {row['tool-copy']:5.2f} s ({line})")
                else:
                    row["hand"], row["hand-copy"] = hand_incremental(
                        sock, work, n, f"hand-{n - 1}.qcow2", size
                    )
                    print(f"  hand {row['hand']:6.2f} s, copy {row['hand-copy']:5.2f} s")
            rows.append(row)
            print(
                f"  wall clock {100 * (row['tool'] / row['hand'] - 1):+.1f} %, "
                f"added around the copy {100 * added(row):+.1f} %"
            )
    finally:
        for p in procs:
            stop(p)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    print(
        f"median of {len(rows)}: tool {med(r['tool'] for r in rows):.2f} s, "
        f"hand {med(r['hand'] for r in rows):.2f} s; wall clock "
        f"{100 * med(r['tool'] / r['hand'] - 1 for r in rows):+.1f} %, added around the copy "
        f"{100 * med(added(r) for r in rows):+.1f} % "
        f"({args.changed_mib} MiB changed in {args.disk_gib} GiB, {args.extent_kib} KiB extents; "
        f"tool on {args.tool_daemon}, hand-written sequence on qsd)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
