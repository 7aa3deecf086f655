#!/usr/bin/env python3
"""Guest writes during a backup (copy-before-write cost): blockd against qemu-storage-daemon.

For each format (qcow2 -> qcow2, raw -> raw) one image of --size-mib MiB of random data is
built once and kept pristine. Every run then works on a fresh copy of it and alternates the
daemons (blockd, QSD, QSD, blockd, ...):

1. start the daemon, add the source and an empty target of the same format, export the source
   writable over NBD on a Unix socket;
2. start ``blockdev-backup sync=full`` with a low ``speed`` (--speed-kib), so the background
   copy barely moves and nearly every guest write meets clusters not yet copied;
3. ``qemu-img bench -w`` writes --write-mib MiB in --block-size requests at queue depth
   --depth over NBD (sequential from --offset-mib): the guest write throughput *during backup*;
   the job must still be running when the bench ends;
4. ``block-job-set-speed`` 0, wait for BLOCK_JOB_COMPLETED, then run the same bench again:
   the *baseline* (no backup; every cluster already allocated, same daemon and image);
5. quit the daemon and check that the target equals the pristine image (the image at job
   start) and that the source holds the bench pattern where the bench wrote.

Prints one line per run and, per case, the median of each daemon and blockd/QSD ratios.
Disk use: about 3 x --size-mib per format (pristine, working copy, target), in a fresh
temporary directory (under --dir if given), deleted at the end.

Usage: ``.venv/bin/python scripts/bench_cbw.py [--size-mib 512] [--runs 2] [--block-size 64k]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from benchlib import (
    KiB,
    MiB,
    Qmp,
    export_nbd,
    img_bench,
    make_target,
    node,
    random_image,
    run,
    same,
    start,
    stop,
)

PATTERN = 0xA5


def bench(uri: str, args: argparse.Namespace) -> float:
    """Seconds one ``qemu-img bench`` write run took (as qemu-img reports it)."""
    count = args.write_mib * MiB // args.block_size
    return img_bench(
        uri,
        "-w",
        "-t",
        "none",
        "-c",
        str(count),
        "-d",
        str(args.depth),
        "-s",
        str(args.block_size),
        "-o",
        str(args.offset_mib * MiB),
        f"--pattern={PATTERN}",
    )


def one_run(
    kind: str, d: Path, pristine: Path, fmt: str, args: argparse.Namespace
) -> tuple[float, float]:
    """(MiB/s during backup, MiB/s baseline) for one daemon on a fresh copy of *pristine*."""
    size = args.size_mib * MiB
    src, tgt = d / f"src.{fmt}", d / f"tgt.{fmt}"
    shutil.copyfile(pristine, src)
    make_target(tgt, fmt, size)
    proc, sock = start(kind, d)
    quit_sent = False
    try:
        q = Qmp(sock)
        q.cmd("blockdev-add", node("src", src, fmt))
        q.cmd("blockdev-add", node("tgt", tgt, fmt))
        uri = export_nbd(q, "src", d / "nbd.sock")
        q.cmd(
            "blockdev-backup",
            {
                "job-id": "b",
                "device": "src",
                "target": "tgt",
                "sync": "full",
                "speed": args.speed_kib * KiB,
            },
        )
        during = bench(uri, args)
        jobs = q.cmd("query-block-jobs")
        if not jobs or jobs[0]["offset"] >= jobs[0]["len"]:
            raise RuntimeError(f"{kind}: the job was no longer running at the end of the bench")
        q.cmd("block-job-set-speed", {"device": "b", "speed": 0})
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        if "error" in ev["data"] or ev["data"]["offset"] != size:
            raise RuntimeError(f"{kind}: backup failed: {ev['data']}")
        baseline = bench(uri, args)
        q.cmd("block-export-del", {"id": "src"})
        q.cmd("nbd-server-stop")
        q.cmd("quit")
        quit_sent = True
    finally:
        stop(proc, 30 if quit_sent else 0)
    if not same(pristine, tgt, fmt):
        raise RuntimeError(f"{kind}: {fmt} target differs from the image at job start")
    out = run(
        "qemu-io",
        "-f",
        fmt,
        "-c",
        f"read -P {PATTERN} {args.offset_mib * MiB} {args.write_mib * MiB}",
        src,
    )
    if "fail" in out.lower() or "error" in out.lower():
        raise RuntimeError(f"{kind}: the source lacks the guest writes: {out[-500:]}")
    src.unlink()
    tgt.unlink()
    mib = args.write_mib
    return mib / during, mib / baseline


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512, help="image size (default 512)")
    ap.add_argument("--write-mib", type=int, default=256, help="bytes the bench writes")
    ap.add_argument("--offset-mib", type=int, default=128, help="where the bench starts")
    ap.add_argument(
        "--block-size",
        type=lambda s: (
            int(s[:-1]) * KiB if s[-1] in "kK" else int(s[:-1]) * MiB if s[-1] in "mM" else int(s)
        ),
        default=64 * KiB,
        help="request size (64k, 1M, ...; default 64k)",
    )
    ap.add_argument("--depth", type=int, default=8, help="queue depth (default 8)")
    ap.add_argument("--speed-kib", type=int, default=64, help="backup speed in KiB/s")
    ap.add_argument("--runs", type=int, default=2, help="runs per daemon and case")
    ap.add_argument("--formats", default="qcow2,raw", help="comma separated (qcow2,raw)")
    ap.add_argument("--only", choices=["blockd", "qsd"], help="run one daemon only")
    ap.add_argument("--dir", type=Path, help="where the temporary work directory goes")
    args = ap.parse_args()
    if args.offset_mib + args.write_mib > args.size_mib:
        ap.error("--offset-mib + --write-mib must fit in --size-mib")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="bench-cbw-", dir=args.dir))
    kinds = [args.only] if args.only else ["blockd", "qsd"]
    try:
        raw = random_image(base / "pristine.raw", args.size_mib)
        print(
            f"{args.write_mib} MiB of {args.block_size // KiB} KiB writes at depth "
            f"{args.depth} over NBD, {args.size_mib} MiB image of random data, backup "
            f"speed {args.speed_kib} KiB/s",
            flush=True,
        )
        summary = []
        for fmt in args.formats.split(","):
            pristine = raw
            if fmt != "raw":
                pristine = base / f"pristine.{fmt}"
                run("qemu-img", "convert", "-f", "raw", "-O", fmt, raw, pristine)
            res: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
            for r in range(args.runs):
                for kind in kinds if r % 2 == 0 else kinds[::-1]:
                    during, baseline = one_run(kind, base, pristine, fmt, args)
                    res[kind].append((during, baseline))
                    print(
                        f"  {fmt:5} run {r + 1} {kind:6} during backup {during:7.1f} MiB/s"
                        f"   baseline {baseline:7.1f} MiB/s   (target verified)",
                        flush=True,
                    )
            if pristine != raw:
                pristine.unlink()
            med = {
                k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
                for k, v in res.items()
            }
            summary.append((fmt, med))
        print()
        for fmt, med in summary:
            line = "  ".join(
                f"{k}: during {m[0]:7.1f} MiB/s baseline {m[1]:7.1f} MiB/s" for k, m in med.items()
            )
            if len(med) == 2:
                b, q = med["blockd"], med["qsd"]
                line += f"  blockd/QSD during {b[0] / q[0]:.2f} baseline {b[1] / q[1]:.2f}"
            print(f"{fmt:5} {line}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
