#!/usr/bin/env python3
"""Sequential read of a monolithicSparse vmdk over NBD: blockd against qemu-storage-daemon.

A 1 GiB (``--size-mib``) monolithicSparse image is filled with data by qemu-io, then both
daemons open it read-only and export it over a Unix socket; ``qemu-img bench`` reads it whole,
sequentially, in 1 MiB (``--block-kib``) requests at queue depth 8, alternating between the
daemons. Prints each run, the medians and the blockd/QSD ratio (the target is >= 1.0).

Usage: scripts/bench_vmdk.py [--size-mib 1024] [--runs 3] [--block-kib 1024] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from benchlib import img_bench, node, run, serve, stop


def make_image(path: Path, size_mib: int) -> None:
    """A monolithicSparse image full of data: 64 MiB writes with changing patterns."""
    run("qemu-img", "create", "-q", "-f", "vmdk", path, f"{size_mib}M")
    cmds: list[str] = []
    for i, off in enumerate(range(0, size_mib, 64)):
        n = min(64, size_mib - off)
        cmds += ["-c", f"write -q -P {i % 255 + 1} {off}M {n}M"]
    run("qemu-io", "-f", "vmdk", *cmds, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    ap.add_argument("--runs", type=int, default=3, help="runs per daemon (default 3)")
    ap.add_argument("--block-kib", type=int, default=1024, help="request size (default 1024)")
    ap.add_argument("--dir", help="work directory (default: a new temporary one)")
    args = ap.parse_args()
    if shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-img") is None:
        print("bench_vmdk: needs qemu-storage-daemon, qemu-img and qemu-io", file=sys.stderr)
        return 2
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-vmdk-"))
    work.mkdir(parents=True, exist_ok=True)
    image = work / "disk.vmdk"
    make_image(image, args.size_mib)
    count = args.size_mib * 1024 // args.block_kib
    procs = {}
    uris = {}
    try:
        for kind in ("blockd", "qsd"):
            spec = node("disk", image, "vmdk", **{"read-only": True})
            procs[kind], uris[kind] = serve(kind, work, spec, False)
        print(
            f"qemu-img bench: {args.block_kib} KiB sequential reads, depth 8, {count} requests "
            f"(the whole {args.size_mib} MiB monolithicSparse image), Unix socket"
        )
        results: dict[str, list[float]] = {"blockd": [], "qsd": []}
        for r in range(args.runs):
            for kind in ("blockd", "qsd") if r % 2 == 0 else ("qsd", "blockd"):
                secs = img_bench(
                    uris[kind], "-c", str(count), "-d", "8", "-s", f"{args.block_kib}K"
                )
                mbs = count * args.block_kib / 1024 / secs
                results[kind].append(mbs)
                print(f"  run {r + 1} {kind:6} {mbs:8.1f} MiB/s", flush=True)
        b = statistics.median(results["blockd"])
        q = statistics.median(results["qsd"])
        print(f"\nread: blockd {b:8.1f} MiB/s   QSD {q:8.1f} MiB/s   blockd/QSD = {b / q:.2f}")
    finally:
        for p in procs.values():
            stop(p)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
