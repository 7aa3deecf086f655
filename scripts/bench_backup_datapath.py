#!/usr/bin/env python3
"""What it would cost blockd-backup to hash a backup's data as it is written, on QEMU.

blockd-backup keeps a hash of every chunk a backup copies. On qemu-storage-daemon a QMP client
cannot see the data during the copy, so the tool reads the new layer back afterwards (see
docs/benchmarks.md). The one way for a client to see each write as it happens would be to
sit in the data path: the target qcow2's file served over NBD by the tool itself, which
writes it to disk and hashes it on the way. This script measures that path's cost before
anyone builds it: qemu-storage-daemon backs up 1 GiB of changed data (1 MiB extents at random
places in a 16 GiB qcow2) into a qcow2 target whose file is either a local file (as the tool
does now) or blockd's NBD export of that file (a Python NBD server on uvloop, which is what
the tool's own server would be, before any hashing). Rounds alternate; the script prints
each copy and the medians.

Usage: .venv/bin/python scripts/bench_backup_datapath.py [--rounds 5] [--changed-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import GiB, Qmp, export_nbd, node, run, start, stop, touch_memory, work_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--changed-mib", type=int, default=1024)
    args = ap.parse_args()
    with work_dir(None, "bench-datapath-") as work:
        times = measure(work, args.rounds, args.changed_mib)
    f, d = statistics.median(times["file"]), statistics.median(times["nbd"])
    print(
        f"median copy of {args.changed_mib} MiB: local file {f:.2f} s, through a Python NBD "
        f"server {d:.2f} s ({100 * (d / f - 1):+.0f} %)"
    )
    return 0


def measure(work: Path, rounds: int, changed_mib: int) -> dict[str, list[float]]:
    """Seconds of each copy, by where the target's file is: "file" or "nbd"."""
    size = 16 * GiB
    run("qemu-img", "create", "-q", "-f", "qcow2", work / "disk.qcow2", str(size))
    run("qemu-img", "create", "-q", "-f", "qcow2", work / "base.qcow2", str(size))
    times: dict[str, list[float]] = {"file": [], "nbd": []}
    procs = []
    try:
        qproc, qsock = start("qsd", work)
        procs.append(qproc)
        bproc, bsock = start("blockd", work)
        procs.append(bproc)
        q, b = Qmp(qsock), Qmp(bsock)
        q.cmd("blockdev-add", node("disk0", work / "disk.qcow2", "qcow2"))
        q.cmd("block-dirty-bitmap-add", {"node": "disk0", "name": "b0"})
        uri = export_nbd(q, "disk0", work / "disk.nbd")
        rng = random.Random(1)
        extents = rng.sample(range(size // (1 << 20)), changed_mib)
        writes = "\n".join(f"write -P {i % 250} {o}M 1M" for i, o in enumerate(extents))
        subprocess.run(
            ["qemu-io", "-f", "raw", uri],
            input=writes.encode(),
            stdout=subprocess.DEVNULL,
            check=True,
        )
        srv = work / "srv.sock"
        b.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(srv)}}})
        n = 0
        for r in range(rounds):
            for via in ("file", "nbd") if r % 2 == 0 else ("nbd", "file"):
                n += 1
                t = work / f"t{n}.qcow2"
                base = work / "base.qcow2"
                run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", t)
                if via == "file":
                    q.cmd("blockdev-add", node(f"t{n}", t, "qcow2"))
                else:
                    # an export has a fixed size: room for the data and qcow2's metadata
                    os.truncate(t, size + GiB)
                    b.cmd(
                        "blockdev-add", {"driver": "file", "node-name": f"f{n}", "filename": str(t)}
                    )
                    b.cmd(
                        "block-export-add",
                        {"type": "nbd", "id": f"e{n}", "node-name": f"f{n}", "writable": True},
                    )
                    nbd = {"driver": "nbd", "server": {"type": "unix", "path": str(srv)}}
                    q.cmd(
                        "blockdev-add",
                        {
                            "driver": "qcow2",
                            "node-name": f"t{n}",
                            "file": {**nbd, "export": f"f{n}"},
                        },
                    )
                touch_memory(work)
                os.sync()
                t0 = time.monotonic()
                q.cmd(
                    "blockdev-backup",
                    {
                        "job-id": f"j{n}",
                        "device": "disk0",
                        "target": f"t{n}",
                        "sync": "bitmap",
                        "bitmap": "b0",
                        "bitmap-mode": "never",  # the same dirty set every round
                    },
                )
                ev = q.wait_event("BLOCK_JOB_COMPLETED")
                took = time.monotonic() - t0
                if ev["data"].get("error"):
                    raise RuntimeError(f"backup via {via} failed: {ev['data']['error']}")
                q.cmd("blockdev-del", {"node-name": f"t{n}"})
                if via == "nbd":
                    b.cmd("block-export-del", {"id": f"e{n}"})
                    deadline = time.monotonic() + 10
                    while b.cmd("query-block-exports") and time.monotonic() < deadline:
                        time.sleep(0.05)
                    b.cmd("blockdev-del", {"node-name": f"f{n}"})
                times[via].append(took)
                print(f"  round {r + 1}: target file {via:4}  copy {took:5.2f} s", flush=True)
                t.unlink()
    finally:
        for proc in procs:
            stop(proc)
    return times


if __name__ == "__main__":
    sys.exit(main())
