#!/usr/bin/env python3
"""block-commit throughput and peak memory: blockd against qemu-storage-daemon on the same
chains.

1 GiB of random data sits in one qcow2 layer over an empty qcow2 base:

* intermediate: ``base <- mid (1 GiB) <- top (empty)``, ``block-commit top-node=mid``, timed
  from the command to BLOCK_JOB_COMPLETED;
* active: ``base <- top (1 GiB)``, ``block-commit device=top``, READY, then
  ``block-job-complete``, timed to BLOCK_JOB_COMPLETED.

The base (and the overlay whose header the commit rewrites) is made anew for every run; the
chain is compared with the data afterwards. Daemons alternate for --rounds rounds; the best
time of each is printed with the ratio and each daemon's peak RSS (VmHWM).

Usage: ``.venv/bin/python scripts/bench_commit.py [--rounds 3] [--dir DIR]``
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from benchlib import GiB, Qmp, header, node, random_image, report, run, timed_job, work_dir


def _chain(d: Path, active: bool) -> None:
    """Fresh base (and top) over the kept 1 GiB layer."""
    for name in ("base", "top") if not active else ("base",):
        p = d / f"{name}.qcow2"
        if p.exists():
            p.unlink()
    run("qemu-img", "create", "-q", "-f", "qcow2", d / "base.qcow2", str(GiB))
    layer = d / ("data_top.qcow2" if active else "mid.qcow2")
    run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", d / "base.qcow2", "-F", "qcow2", layer)
    if not active:
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", layer, "-F", "qcow2", d / "top.qcow2")


def run_one(kind: str, d: Path, active: bool) -> tuple[float, float]:
    _chain(d, active)
    top = d / ("data_top.qcow2" if active else "top.qcow2")
    subprocess.run(["cat", str(d / "data.raw")], stdout=subprocess.DEVNULL, check=True)
    nodes = [node("base", d / "base.qcow2", "qcow2")]
    if not active:
        nodes.append(node("mid", d / "mid.qcow2", "qcow2", backing="base"))
    nodes.append(node("top", top, "qcow2", backing="base" if active else "mid"))

    def job(q: Qmp) -> None:
        if active:
            q.cmd("block-commit", {"job-id": "c", "device": "top"})
            q.wait_event("BLOCK_JOB_READY")
            q.cmd("block-job-complete", {"device": "c"})
        else:
            q.cmd("block-commit", {"job-id": "c", "device": "top", "top-node": "mid"})

    elapsed, rss = timed_job(kind, d, nodes, job)
    res = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", d / "base.qcow2", d / "data.raw"],
        capture_output=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{kind}: the base does not hold the committed data")
    return elapsed, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    with work_dir(args.dir, "bench-commit-") as d:
        data = d / "data.raw"
        if not data.exists():
            random_image(data, 1024)
        for name in ("mid.qcow2", "data_top.qcow2"):
            if not (d / name).exists():
                run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", data, d / name)
        header()
        report("intermediate commit 1 GiB", args.rounds, lambda k: run_one(k, d, False))
        report("active commit 1 GiB", args.rounds, lambda k: run_one(k, d, True))
        print("time: command to BLOCK_JOB_COMPLETED (active: READY, then block-job-complete)")
        print("ratio = QSD time / blockd time (>1: blockd faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
