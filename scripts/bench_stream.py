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
import subprocess
from pathlib import Path
from typing import Any

from benchlib import (
    MiB,
    header,
    node,
    random_image,
    report,
    run,
    same,
    timed_job,
    work_dir,
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
    with work_dir(args.dir, "bench-stream-", keep=args.keep) as d:
        make_images(d)
        refs = {"whole chain": d / "base.qcow2", "to base-node": d / "m2.qcow2"}
        data = {"whole chain": 1024, "to base-node": 512}
        header()
        for case in CASES:
            report(
                f"{case}, {data[case]} MiB",
                args.rounds,
                lambda kind, c=case: run_one(kind, d, c, refs[c]),
                mib=data[case],
            )
        print("ratio = QSD time / blockd time (>1: blockd faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
