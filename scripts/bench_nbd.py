#!/usr/bin/env python3
"""NBD export throughput: blockd against qemu-storage-daemon on the same image.

``qemu-img bench`` does 1 MiB (``--block-kib``) sequential reads and then writes, queue depth 8,
over a Unix socket, against a blockd export and a QSD export of identical copies of one raw
image. Runs alternate between the two daemons so drift of the machine (page cache, CPU
frequency) hits both alike. Prints each run, the medians and the blockd/QSD ratio.

Usage: scripts/bench_nbd.py [--size-mib 1024] [--count 2048] [--runs 3] [--block-kib 1024]
[--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchlib import MiB, img_bench, node, serve, stop


def bench(uri: str, write: bool, count: int, block_kib: int = 1024) -> float:
    """MiB/s of one qemu-img bench run."""
    opts = ["-c", str(count), "-d", "8", "-s", f"{block_kib}K", *(["-w"] if write else [])]
    return count * block_kib / 1024 / img_bench(uri, *opts)


def fill(path: Path, size: int) -> None:
    block = bytes(range(256)) * (MiB // 256)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    ap.add_argument("--count", type=int, default=2048, help="requests per run (default 2048)")
    ap.add_argument("--runs", type=int, default=3, help="runs per daemon and mode (default 3)")
    ap.add_argument("--dir", help="work directory (default: a new temporary one)")
    ap.add_argument(
        "--block-kib",
        type=int,
        default=1024,
        help="request size in KiB (default 1024; 64 shows per-request cost)",
    )
    args = ap.parse_args()
    if shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-img") is None:
        print("bench_nbd: needs qemu-storage-daemon and qemu-img", file=sys.stderr)
        return 2
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-nbd-"))
    work.mkdir(parents=True, exist_ok=True)
    images = {k: work / f"{k}.raw" for k in ("blockd", "qsd")}
    fill(images["blockd"], args.size_mib * MiB)
    shutil.copyfile(images["blockd"], images["qsd"])
    procs = {}
    uris = {}
    try:
        for kind in ("blockd", "qsd"):
            procs[kind], uris[kind] = serve(kind, work, node("disk", images[kind], "raw"), True)
        results: dict[tuple[str, str], list[float]] = {}
        print(
            f"qemu-img bench: {args.block_kib} KiB sequential, depth 8, {args.count} requests "
            "per run, "
            f"{args.size_mib} MiB raw image, Unix socket"
        )
        for mode in ("read", "write"):
            for run in range(args.runs):
                for kind in ("blockd", "qsd") if run % 2 == 0 else ("qsd", "blockd"):
                    mbs = bench(uris[kind], mode == "write", args.count, args.block_kib)
                    results.setdefault((kind, mode), []).append(mbs)
                    print(f"  {mode:5} run {run + 1} {kind:6} {mbs:8.1f} MiB/s", flush=True)
        print()
        for mode in ("read", "write"):
            b = statistics.median(results[("blockd", mode)])
            q = statistics.median(results[("qsd", mode)])
            print(
                f"{mode:5}: blockd {b:8.1f} MiB/s   QSD {q:8.1f} MiB/s   blockd/QSD = {b / q:.2f}"
            )
    finally:
        for p in procs.values():
            stop(p)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
