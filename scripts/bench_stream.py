#!/usr/bin/env python3
"""block-stream throughput and peak memory: blockd against qemu-storage-daemon on the same
chains.

Cases (images in --dir, default a fresh temporary directory):

* ``whole chain``: a qcow2 base holding 1 GiB of random data, an empty qcow2 overlay on it;
  ``block-stream`` without a base copies all of it into the overlay, which ends standalone;
* ``to base-node``: base <- mid <- top, 512 MiB of random data in base and 512 MiB in mid
  (half of it over base's); ``block-stream base-node=base`` copies mid's data into top, which
  then backs onto base.

Each round recreates the overlays, warms the page cache, starts the daemon, opens the chain,
and times ``block-stream`` from the command to BLOCK_JOB_COMPLETED; blockd and QSD alternate,
--rounds rounds each. The result is checked (the overlay reads what the chain read, its header
names the base). Peak memory is the daemon's VmHWM read from /proc when the job has finished.
Prints the best time of each daemon, the throughput of the data copied, the ratio and both
peak RSS values.

Usage: ``.venv/bin/python scripts/bench_stream.py [--rounds 3] [--dir DIR] [--keep]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchlib import (
    MiB,
    node,
    random_image,
    run,
    same,
    timed_job,
)

CASES = ("whole chain", "to base-node")


def make_images(d: Path) -> None:
    """base.qcow2 (1 GiB random), and for the second case b2 (the first 512 MiB of the same
    data, 1 GiB virtual) under m2 (512 MiB of it again, written at 256 MiB)."""
    if (d / "base.qcow2").exists():
        return
    raw = random_image(d / "rand.raw", 1024)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, d / "base.qcow2")
    half = d / "half.raw"
    with open(raw, "rb") as src, open(half, "wb") as out:
        out.write(src.read(512 * MiB))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", half, d / "b2.qcow2")
    run("qemu-img", "resize", "-q", d / "b2.qcow2", "1G")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "b2.qcow2", "-F", "qcow2", d / "m2.qcow2")
    run("qemu-io", "-f", "qcow2", "-c", f"write -q -s {half} 256M 512M", d / "m2.qcow2")
    half.unlink()


def chain_args(case: str, d: Path) -> tuple[list[dict[str, Any]], dict[str, Any], Path, str]:
    """The blockdev-add list, the block-stream arguments, the overlay and its new base."""
    if case == "whole chain":
        run(
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            d / "top.qcow2",
        )
        nodes = [
            node("base", d / "base.qcow2", "qcow2"),
            node("top", d / "top.qcow2", "qcow2", backing="base"),
        ]
        return nodes, {"job-id": "s", "device": "top"}, d / "top.qcow2", ""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "m2.qcow2", "-F", "qcow2", d / "t2.qcow2")
    nodes = [
        node("b2", d / "b2.qcow2", "qcow2"),
        node("m2", d / "m2.qcow2", "qcow2", backing="b2"),
        node("t2", d / "t2.qcow2", "qcow2", backing="m2"),
    ]
    args = {"job-id": "s", "device": "t2", "base-node": "b2"}
    return nodes, args, d / "t2.qcow2", str(d / "b2.qcow2")


def run_one(kind: str, d: Path, case: str, reference: Path) -> tuple[float, float]:
    nodes, args, overlay, base = chain_args(case, d)
    for f in ("base.qcow2", "b2.qcow2", "m2.qcow2"):
        subprocess.run(["cat", str(d / f)], stdout=subprocess.DEVNULL, check=True)
    elapsed, rss = timed_job(kind, d, nodes, lambda q: q.cmd("block-stream", args))
    info = json.loads(run("qemu-img", "info", "--output=json", overlay))
    if info.get("backing-filename", "") != base:
        raise RuntimeError(f"{kind}: {overlay.name} backs onto {info.get('backing-filename')}")
    if not same(overlay, reference, "qcow2"):
        raise RuntimeError(f"{kind}: {overlay.name} reads other data than the chain did")
    overlay.unlink()
    return elapsed, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the images")
    args = ap.parse_args()
    d = args.dir or Path(tempfile.mkdtemp(prefix="bench-stream-"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        make_images(d)
        refs = {"whole chain": d / "base.qcow2", "to base-node": d / "m2.qcow2"}
        data = {"whole chain": 1024, "to base-node": 512}
        print(
            f"{'case':14} {'MiB':>5} {'blockd s':>9} {'qsd s':>7} {'blockd MiB/s':>13} "
            f"{'qsd MiB/s':>10} {'ratio':>6} {'blockd RSS':>11} {'qsd RSS':>8}"
        )
        for case in CASES:
            best = {"blockd": float("inf"), "qsd": float("inf")}
            rss = {"blockd": 0.0, "qsd": 0.0}
            for _ in range(args.rounds):
                for kind in ("blockd", "qsd"):
                    t, r = run_one(kind, d, case, refs[case])
                    best[kind] = min(best[kind], t)
                    rss[kind] = max(rss[kind], r)
            b, q = best["blockd"], best["qsd"]
            mib = data[case]
            print(
                f"{case:14} {mib:5} {b:9.2f} {q:7.2f} {mib / b:13.0f} {mib / q:10.0f} "
                f"{q / b:6.2f} {rss['blockd']:8.0f} MiB {rss['qsd']:4.0f} MiB",
                flush=True,
            )
        print("ratio = blockd throughput / QSD throughput (>1: blockd faster)")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
