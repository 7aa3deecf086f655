#!/usr/bin/env python3
"""Sequential 1 MiB writes into an empty qcow2 image vs a raw file, both through blockd's block
graph in the same run (qcow2 write-path overhead; the target is qcow2 >= 80 % of raw).

Usage: scripts/bench_qcow2.py [--total-mib 1024] [--dir /tmp] [--depth 1] [--cluster-size 65536]
                              [--rounds 3]

Runs alternate raw and qcow2 *rounds* times and report the best of each (the page cache and
the kernel's writeback make single runs noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from typing import Any

from blockd.block.graph import BlockGraph
from blockd.qapi.base import ArgsValidator
from blockd.qapi.block import BlockdevOptions

MiB = 1024 * 1024


async def run_one(spec: dict[str, Any], total: int, depth: int, buf: bytes) -> float:
    graph = BlockGraph()
    node = await graph.add(ArgsValidator(BlockdevOptions).validate(spec))
    nreq = total // MiB
    t0 = time.perf_counter()
    nxt = 0

    async def worker() -> None:
        nonlocal nxt
        while nxt < nreq:
            i = nxt
            nxt += 1
            await node.write(i * MiB, buf)

    await asyncio.gather(*(worker() for _ in range(depth)))
    await node.flush()
    elapsed = time.perf_counter() - t0
    await graph.close_all()
    return total / MiB / elapsed


def prepare(fmt: str, raw: str, q: str, total: int, cluster_size: int) -> None:
    """Fresh target file; no dirty page cache left from the previous run, so the kernel's
    writeback of one run does not throttle the next."""
    for p in (raw, q):
        if os.path.exists(p):
            os.unlink(p)
    os.sync()
    if fmt == "raw":
        with open(raw, "wb") as f:
            f.truncate(total)
    else:
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                f"cluster_size={cluster_size}",
                q,
                str(total),
            ],
            check=True,
        )


def check_clean(path: str) -> None:
    check = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"qemu-img check failed:\n{check.stdout}{check.stderr}")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--total-mib", type=int, default=1024)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--cluster-size", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    total = args.total_mib * MiB
    buf = os.urandom(MiB)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        raw = os.path.join(d, "bench.raw")
        q = os.path.join(d, "bench.qcow2")
        best_raw = best_q = 0.0
        for _ in range(args.rounds):
            for fmt in ("raw", "qcow2"):
                prepare(fmt, raw, q, total, args.cluster_size)
                if fmt == "raw":
                    spec: dict[str, Any] = {
                        "driver": "raw",
                        "node-name": "r",
                        "file": {"driver": "file", "filename": raw},
                    }
                    best_raw = max(best_raw, await run_one(spec, total, args.depth, buf))
                    continue
                spec = {
                    "driver": "qcow2",
                    "node-name": "q",
                    "file": {"driver": "file", "filename": q},
                }
                best_q = max(best_q, await run_one(spec, total, args.depth, buf))
                check_clean(q)
    print(f"raw   : {best_raw:8.1f} MiB/s")
    print(f"qcow2 : {best_q:8.1f} MiB/s")
    print(f"ratio : {best_q / best_raw * 100:6.1f} %")


if __name__ == "__main__":
    asyncio.run(main())
