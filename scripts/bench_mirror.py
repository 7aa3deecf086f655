#!/usr/bin/env python3
"""Mirror throughput and peak memory: blockd against qemu-storage-daemon on the same images.

Source: 1 GiB of random data, as raw and as qcow2. Each case runs ``blockdev-mirror
sync=full`` onto a fresh empty target of the same format, waits for BLOCK_JOB_READY, then
``block-job-complete`` and BLOCK_JOB_COMPLETED; the time is from the command to COMPLETED.
blockd and QSD alternate for --rounds rounds; the best time of each is printed with the ratio
and each daemon's peak RSS (VmHWM) at the end of the job. The target is compared with the
source after every run.

Usage: ``.venv/bin/python scripts/bench_mirror.py [--rounds 3] [--dir DIR]``
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from benchlib import (
    GiB,
    Qmp,
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


def run_one(kind: str, d: Path, src: Path, fmt: str, size: int) -> tuple[float, float]:
    tgt = d / f"target.{fmt}"
    make_target(tgt, fmt, size)
    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # warm the cache

    def job(q: Qmp) -> None:
        q.cmd("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt", "sync": "full"})
        q.wait_event("BLOCK_JOB_READY")
        q.cmd("block-job-complete", {"device": "m"})

    elapsed, rss = timed_job(kind, d, [node("src", src, fmt), node("tgt", tgt, fmt)], job)
    ok = same(src, tgt, fmt)
    tgt.unlink()
    if not ok:
        raise RuntimeError(f"{kind}: target differs from source")
    return elapsed, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    with work_dir(args.dir, "bench-mirror-") as d:
        dense = d / "dense.raw"
        if not dense.exists():
            random_image(dense, 1024)
        q2 = d / "dense.qcow2"
        if not q2.exists():
            run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", dense, q2)
        header()
        cases = (("1 GiB raw -> raw", dense, "raw"), ("1 GiB qcow2 -> qcow2", q2, "qcow2"))
        for label, src, fmt in cases:
            report(label, args.rounds, lambda kind, s=src, f=fmt: run_one(kind, d, s, f, GiB))
        print("time: command to BLOCK_JOB_COMPLETED (READY, then block-job-complete)")
        print("ratio = QSD time / blockd time (>1: blockd faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
