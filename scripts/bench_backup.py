#!/usr/bin/env python3
"""Full-backup throughput and peak memory: blockd against qemu-storage-daemon on the same images.

Images (in --dir, default a fresh temporary directory):

* ``dense``: 1 GiB of random data (raw);
* ``sparse``: a 64 GiB (``--sparse-gib``) sparse raw image holding 1 GiB of random data in 64
  extents of 16 MiB (its raw target takes the full size on disk: both daemons reserve zero
  ranges with fallocate; cases that do not fit are skipped with a message);
* the same two as qcow2 when blockd has the qcow2 driver (qcow2 -> qcow2).

Each case runs ``blockdev-backup sync=full`` onto a fresh empty target of the same format,
alternating blockd and QSD for --rounds rounds, timing from the command to
BLOCK_JOB_COMPLETED. Peak memory is the daemon's VmHWM (peak RSS) read from /proc when the
job has finished. Prints one line per case with the best time of each daemon and the ratio.

Usage: ``.venv/bin/python scripts/bench_backup.py [--rounds 2] [--dir DIR] [--keep]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchlib import (
    ROOT,
    GiB,
    MiB,
    header,
    make_target,
    node,
    random_image,
    report,
    run,
    same,
    timed_job,
    work_dir,
)


def make_images(
    d: Path, with_qcow2: bool, sparse_gib: int = 64
) -> list[tuple[str, Path, str, int]]:
    cases = []
    dense = d / "dense.raw"
    if not dense.exists():
        random_image(dense, 1024)
    cases.append(("1 GiB dense raw", dense, "raw", GiB))
    sparse = d / f"sparse{sparse_gib}.raw"
    if not sparse.exists():
        with open(sparse, "wb") as f:
            f.truncate(sparse_gib * GiB)
            extents = 64
            for i in range(extents):  # 64 extents of 16 MiB spread over the disk
                f.seek(i * (sparse_gib * GiB // extents) + 3 * MiB)
                for _ in range(16):
                    f.write(os.urandom(MiB))
    cases.append((f"{sparse_gib} GiB sparse raw (1 GiB data)", sparse, "raw", sparse_gib * GiB))
    if with_qcow2:
        for label, src, size in (
            ("1 GiB dense qcow2", dense, GiB),
            (f"{sparse_gib} GiB sparse qcow2 (1 GiB data)", sparse, sparse_gib * GiB),
        ):
            q = src.with_suffix(".qcow2")
            if not q.exists():
                run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-S", "64k", src, q)
            cases.append((label, q, "qcow2", size))
    return cases


def run_one(kind: str, d: Path, src: Path, fmt: str, size: int) -> tuple[float, float]:
    tgt = d / f"target.{fmt}"
    make_target(tgt, fmt, size)
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # warm the cache
    elapsed, rss = timed_job(
        kind,
        d,
        [node("src", src, fmt), node("tgt", tgt, fmt)],
        lambda q: q.cmd(
            "blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt", "sync": "full"}
        ),
    )
    ok = same(src, tgt, fmt)
    tgt.unlink()
    if not ok:
        raise RuntimeError(f"{kind}: target differs from source")
    return elapsed, rss


def target_needs(fmt: str, size: int) -> int:
    """Disk a backup target takes: both daemons write a raw target's zero ranges with
    fallocate(ZERO_RANGE) (no discard=unmap), which reserves the whole disk; a qcow2 target
    holds the data and its metadata."""
    return size + 256 * MiB if fmt == "raw" else 2 * GiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the images")
    ap.add_argument("--no-qcow2", action="store_true")
    ap.add_argument(
        "--sparse-gib",
        type=int,
        default=64,
        help="virtual size of the sparse image (its raw target needs that much disk)",
    )
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from blockd.block.driver import driver_class

    with_qcow2 = not args.no_qcow2 and driver_class("qcow2") is not None
    with work_dir(args.dir, "bench-backup-", keep=args.keep) as d:
        cases = make_images(d, with_qcow2, args.sparse_gib)
        header()
        for label, src, fmt, size in cases:
            free = shutil.disk_usage(d).free
            if free < target_needs(fmt, size):
                print(
                    f"{label:34} skipped: its target needs {target_needs(fmt, size) / GiB:.1f} "
                    f"GiB free, {free / GiB:.1f} GiB left (try --sparse-gib)",
                    flush=True,
                )
                continue
            # both cases carry 1 GiB of data
            report(label, args.rounds, lambda k, s=src, f=fmt, n=size: run_one(k, d, s, f, n))
        print("ratio = blockd throughput / QSD throughput (>1: blockd faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
