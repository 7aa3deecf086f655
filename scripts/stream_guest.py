#!/usr/bin/env python3
"""A stream of a 1 GiB chain while a guest rewrites and reads back random blocks over NBD.

The chain is base <- mid <- top (qcow2), each layer holding seeded random data in random
extents (some unaligned, some zeroed over older data). blockd opens it, exports top writable
over NBD, and runs ``block-stream`` (into top; with ``base-node``, ``bottom`` or neither, by
seed) throttled to --speed-mib MiB/s while --lanes NBD clients write and read back their own
4 KiB blocks of the disk (tests/jobs/stream/streamload.py: every read is checked against what
the disk must hold at that moment, so a stale byte is caught when it is read). With --cancel
the job is cancelled at a random moment in its first --cancel-within seconds. Afterwards the
whole disk is read back over NBD and compared, the daemon stops, and every image must pass
qemu-img check while top reads what the guest last saw.

Disk use: about 3.5 x size. Exit status 0 when every run passed.

Usage: ``.venv/bin/python scripts/stream_guest.py [--size-mib 1024] [--runs 1] [--seed N]
[--speed-mib 256] [--cancel] [--dir DIR] [--keep]``
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "jobs" / "stream")]

from streamload import MiB, add_chain, build_template, chain_copy, run_seed  # noqa: E402
from support import connect, qemu_img, start_blockd  # noqa: E402


async def one_run(
    args: argparse.Namespace, d: Path, template: Path, start: bytes, seed: int
) -> bool:
    run_dir = d / f"run{seed}"
    chain_copy(template, run_dir)
    daemon = start_blockd(run_dir)
    nbd = run_dir / "nbd.sock"
    try:
        async with connect(daemon.sock) as (qmp, events):
            await qmp.execute(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}}
            )
            await add_chain(qmp, run_dir, f"-{seed}")
            await qmp.execute(
                "block-export-add",
                {
                    "type": "nbd",
                    "id": "e",
                    "name": f"s{seed}",
                    "node-name": f"top-{seed}",
                    "writable": True,
                },
            )
            res = await run_seed(
                qmp,
                events,
                run_dir,
                nbd,
                seed,
                start,
                speed=args.speed_mib * MiB,
                cancel=args.cancel,
                cancel_within=args.cancel_within,
                lanes=args.lanes,
            )
    finally:
        daemon.stop()
    ok = not res.errors
    for name in ("base", "mid", "top"):
        chk = qemu_img("check", run_dir / f"{name}.qcow2", check=False)
        ok = ok and chk.returncode == 0
        if chk.returncode:
            print(f"  {name}.qcow2: qemu-img check exited {chk.returncode}: {chk.stdout}")
    same = qemu_img(
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        run_dir / "guest.raw",
        run_dir / "top.qcow2",
        check=False,
    )
    ok = ok and same.returncode == 0
    mib = res.written / MiB
    print(
        f"seed {seed}: {res.event}, {res.seconds:.1f} s, guest {res.ops} requests "
        f"({res.checked} reads checked, {mib:.1f} MiB written), "
        f"{'PASS' if ok else 'FAIL'} {'; '.join(res.errors[:3])}{same.stdout.strip()}",
        flush=True,
    )
    if ok and not args.keep:
        shutil.rmtree(run_dir)
    return ok


async def main_async(args: argparse.Namespace) -> int:
    d = args.dir or Path(tempfile.mkdtemp(prefix="stream-guest-"))
    d.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MiB
    template = d / "template"
    if not (template / "top.qcow2").exists():
        template.mkdir(exist_ok=True)
        t0 = time.monotonic()
        build_template(template, size, seed=args.seed)
        print(f"built the chain in {time.monotonic() - t0:.1f} s", flush=True)
    qemu_img("convert", "-O", "raw", template / "top.qcow2", d / "start.raw")
    start = (d / "start.raw").read_bytes()
    failed = 0
    for i in range(args.runs):
        if not await one_run(args, d, template, start, args.seed + i):
            failed += 1
    if not args.keep and args.dir is None and not failed:
        shutil.rmtree(d, ignore_errors=True)
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--speed-mib", type=int, default=256)
    ap.add_argument("--lanes", type=int, default=8)
    ap.add_argument("--cancel", action="store_true")
    ap.add_argument("--cancel-within", type=float, default=2.0)
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--keep", action="store_true")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
