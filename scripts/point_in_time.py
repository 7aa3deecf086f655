#!/usr/bin/env python3
"""Point-in-time check of a throttled full backup while an NBD client rewrites the source.

For each seed:

1. build a source image of --size-mib MiB (default 1 GiB): seeded random data in random
   extents covering about --fill percent of it, the rest left sparse;
2. keep a copy of it (``qemu-img convert``) and create an empty target of the same size;
3. start the daemon (blockd; with --qsd each seed runs again on qemu-storage-daemon), add both
   nodes, export the source writable over NBD on a Unix socket, start ``blockdev-backup
   sync=full`` limited to --speed-mib MiB/s (default: what lasts about --seconds seconds);
4. once the backup command has returned, --writers qemu-io processes rewrite random ranges of
   the source over NBD without pause (writes with random patterns, unaligned ones included,
   write-zeroes and discards), each in its own stripe of the image, in batches, until the job
   completes;
5. check: the target equals the copy, i.e. the image as it was when the job started; and the
   source equals the copy with every logged NBD request replayed onto it by qemu-io, i.e. no
   write was lost or reordered on the way. A discard (NBD trim) is only advice to the server,
   and QEMU drops those that arrive while a backup runs; if the exact comparison fails, the
   ranges whose last request was a discard are left out of it, and the result says so;
6. print the result, the seed, and the bytes rewritten while the job ran (requests of batches
   that finished before BLOCK_JOB_COMPLETED; those of batches still running at that moment are
   shown apart); delete the images unless --keep.

Disk use per run: about 2.2 x size x fill (source, copy, target), images in --dir (default a new
temporary directory). Exit status 0 when every run passed.

Usage: ``.venv/bin/python scripts/point_in_time.py [--size-mib 1024] [--seed N] [--runs 1]
[--qsd] [--format raw|qcow2]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import MiB, make_target, node, run, same, start, stop
from qemu.qmp import QMPClient

CLUSTER = 64 * 1024


def qemu_io(fmt: str, target: str | Path, cmds: list[str]) -> None:
    """Run *cmds* in one qemu-io process; discards are passed on (``-d unmap``)."""
    args: list[str | Path] = ["qemu-io", "-f", fmt, "-d", "unmap"]
    for c in cmds:
        args += ["-c", c]
    out = run(*args, target)
    if "error" in out.lower() or "failed" in out.lower():
        raise RuntimeError(f"qemu-io on {target}: {out[-2000:]}")


# -- the image and the writes ---------------------------------------------------------------------
def build_source(path: Path, size: int, fill: float, rng: random.Random, fmt: str) -> int:
    """Random data in random 1-16 MiB extents until about *fill* of the image holds data;
    returns the bytes written."""
    raw = path if fmt == "raw" else path.with_suffix(".build.raw")
    written = 0
    with open(raw, "wb") as f:
        f.truncate(size)
        while written < fill * size:
            n = min(rng.randint(1, 16) * MiB, size)
            off = rng.randrange(0, size - n + 1, CLUSTER)
            f.seek(off)
            for _ in range(n // MiB):
                f.write(rng.randbytes(MiB))
            written += n
    if fmt != "raw":
        run("qemu-img", "convert", "-f", "raw", "-O", fmt, raw, path)
        raw.unlink()
    return written


def request(rng: random.Random, lo: int, hi: int, discards: float) -> tuple[str, int, int]:
    """One random NBD request inside [lo, hi): the qemu-io command, its offset and length."""
    kind = rng.random()
    if kind < 0.1:  # write-zeroes, sector aligned
        off = rng.randrange(lo, hi - 512, 512)
        n = min(rng.choice([4096, CLUSTER, 256 * 1024, MiB]), hi - off)
        return f"write -z {off} {n}", off, n
    if kind < 0.1 + discards:  # discard of whole MiBs: a raw file punches a hole
        first, last = -(-lo // MiB), hi // MiB
        if last - first >= 1:
            start = rng.randrange(first, last)
            count = rng.randint(1, min(4, last - start))
            return f"discard {start * MiB} {count * MiB}", start * MiB, count * MiB
    off = rng.randrange(lo, hi - 1)
    if rng.random() < 0.5:
        off -= off % CLUSTER
    n = rng.choice([512, 4096, CLUSTER, 200_000, MiB, rng.randint(1, 2 * MiB)])
    n = max(1, min(n, hi - off))
    return f"write -P {rng.randrange(1, 256)} {off} {n}", off, n


def subtract(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """*ranges* (start, end) without [start, end)."""
    out = []
    for a, b in ranges:
        if b <= start or a >= end:
            out.append((a, b))
            continue
        if a < start:
            out.append((a, start))
        if b > end:
            out.append((end, b))
    return out


@dataclass
class Writer:
    """One qemu-io client at a time, rewriting [lo, hi) in batches until told to stop."""

    uri: str
    lo: int
    hi: int
    rng: random.Random
    batch: int
    discards: float
    log: list[str] = field(default_factory=list)
    #: (finished at, bytes, requests) per batch
    batches: list[tuple[float, int, int]] = field(default_factory=list)
    #: Ranges whose last request was a discard. NBD trim is advisory: a server may drop it
    #: (QEMU does while a backup runs, its copy-before-write filter not being opened with
    #: discard=unmap), so these may hold the old data or zeroes.
    discarded: list[tuple[int, int]] = field(default_factory=list)
    error: BaseException | None = None

    def run(self, halt: threading.Event) -> None:
        try:
            while not halt.is_set():
                reqs = [
                    request(self.rng, self.lo, self.hi, self.discards) for _ in range(self.batch)
                ]
                qemu_io("raw", self.uri, [c for c, _, _ in reqs])
                self.log += [c for c, _, _ in reqs]
                for c, off, n in reqs:
                    self.discarded = subtract(self.discarded, off, off + n)
                    if c.startswith("discard"):
                        self.discarded.append((off, off + n))
                self.batches.append((time.monotonic(), sum(n for _, _, n in reqs), len(reqs)))
        except BaseException as exc:  # reported by the main thread
            self.error = exc


# -- the backup --------------------------------------------------------------------------------
async def backup_under_writes(
    kind: str, d: Path, fmt: str, speed: int, timeout: float, writers: list[Writer]
) -> dict[str, Any]:
    """Steps 3 and 4; returns timings and the job's completion event data."""
    proc, sock = start(kind, d)
    qmp = QMPClient(f"point-in-time-{kind}")
    quit_sent = False
    try:
        await qmp.connect(str(sock))
        with qmp.listener() as events:
            await qmp.execute("blockdev-add", node("src", d / f"src.{fmt}", fmt, discard="unmap"))
            await qmp.execute("blockdev-add", node("tgt", d / f"tgt.{fmt}", fmt))
            nbd = {"type": "unix", "data": {"path": str(d / "nbd.sock")}}
            await qmp.execute("nbd-server-start", {"addr": nbd})
            await qmp.execute(
                "block-export-add",
                {"type": "nbd", "id": "exp", "node-name": "src", "writable": True},
            )
            args = {"job-id": "pit", "device": "src", "target": "tgt", "sync": "full"}
            await qmp.execute("blockdev-backup", {**args, "speed": speed})
            started = time.monotonic()
            halt = threading.Event()
            threads = [threading.Thread(target=w.run, args=(halt,)) for w in writers]
            for t in threads:
                t.start()
            try:
                done: dict[str, Any] = {}
                async with asyncio.timeout(timeout):
                    async for ev in events:
                        if ev["event"] == "BLOCK_JOB_ERROR":
                            print(f"  {kind}: BLOCK_JOB_ERROR {ev['data']}", flush=True)
                        if ev["event"] == "BLOCK_JOB_COMPLETED":
                            done = dict(ev["data"])
                            break
                finished = time.monotonic()
            finally:
                halt.set()
                for t in threads:
                    await asyncio.to_thread(t.join)
            for w in writers:
                if w.error is not None:
                    raise RuntimeError(f"NBD writer failed: {w.error}")
            await qmp.execute("block-export-del", {"id": "exp"})
            await qmp.execute("nbd-server-stop")
            await qmp.execute("blockdev-del", {"node-name": "src"})
            await qmp.execute("blockdev-del", {"node-name": "tgt"})
        await qmp.execute("quit")
        quit_sent = True
    finally:
        try:
            await qmp.disconnect()
        except EOFError:
            pass  # the daemon closed the connection first, as it does on quit
        stop(proc, 30 if quit_sent else 0)
    return {"started": started, "finished": finished, "done": done}


# -- one run ------------------------------------------------------------------------------------
def one_run(kind: str, seed: int, args: argparse.Namespace, base: Path) -> bool:
    rng = random.Random(seed)
    size = args.size_mib * MiB
    fmt = args.format
    speed = args.speed_mib * MiB if args.speed_mib else max(MiB, size // args.seconds)
    d = base / f"{kind}-{seed}"
    d.mkdir(parents=True)
    src, orig, tgt = (d / f"{n}.{fmt}" for n in ("src", "orig", "tgt"))
    try:
        t0 = time.monotonic()
        data = build_source(src, size, args.fill / 100, rng, fmt)
        run("qemu-img", "convert", "-f", fmt, "-O", fmt, src, orig)
        make_target(tgt, fmt, size)
        print(
            f"{kind} seed {seed}: {args.size_mib} MiB {fmt} image with {data // MiB} MiB of data "
            f"built in {time.monotonic() - t0:.1f} s; backup at {speed / MiB:.0f} MiB/s, "
            f"{args.writers} NBD writer(s)",
            flush=True,
        )
        uri = f"nbd+unix:///src?socket={d / 'nbd.sock'}"
        stripe = size // args.writers
        writers = []
        for i in range(args.writers):
            hi = size if i == args.writers - 1 else (i + 1) * stripe
            wrng = random.Random(rng.getrandbits(64))
            discards = args.discard_percent / 100
            writers.append(Writer(uri, i * stripe, hi, wrng, args.batch, discards))
        timeout = 60 + 5 * size / speed
        res = asyncio.run(backup_under_writes(kind, d, fmt, speed, timeout, writers))
        done, finished = res["done"], res["finished"]
        during = [b for w in writers for b in w.batches if b[0] <= finished]
        around = [b for w in writers for b in w.batches if b[0] > finished]
        n_during, b_during = sum(b[2] for b in during), sum(b[1] for b in during)
        n_around, b_around = sum(b[2] for b in around), sum(b[1] for b in around)
        job_s = finished - res["started"]
        print(
            f"  job: {job_s:.1f} s, len {done.get('len')}, offset {done.get('offset')}"
            + (f", error {done['error']}" if "error" in done else ""),
            flush=True,
        )
        print(
            f"  rewritten during the job: {b_during} bytes ({b_during / MiB:.1f} MiB) in "
            f"{n_during} requests; around completion: {b_around} bytes in {n_around} requests",
            flush=True,
        )
        ok_job = "error" not in done and done.get("offset") == size
        ok_target = same(orig, tgt, fmt)
        # replay the logged requests onto the copy: the source must have got exactly those
        for w in writers:
            for i in range(0, len(w.log), 400):
                qemu_io(fmt, orig, w.log[i : i + 400])
        ok_source = exact = same(orig, src, fmt)
        discarded = [r for w in writers for r in w.discarded]
        if not exact and discarded:
            # a dropped discard leaves the old data: compare the rest (zero those ranges)
            zero = [f"write -z {a} {b - a}" for a, b in discarded]
            for img in (orig, src):
                qemu_io(fmt, img, zero)
            ok_source = same(orig, src, fmt)
        meaningful = n_during > 0
        ok = ok_job and ok_target and ok_source and meaningful
        verdict = "PASS" if ok else "FAIL"
        how = "" if exact or not ok_source else f" (outside {len(discarded)} discarded ranges)"
        print(
            f"  {verdict}: target == image at job start: {ok_target}; source == copy + "
            f"replayed requests: {ok_source}{how}; job succeeded: {ok_job}; writes while the "
            f"job ran: {meaningful}",
            flush=True,
        )
        return ok
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    ap.add_argument("--fill", type=float, default=50, help="percent holding data (default 50)")
    ap.add_argument("--format", choices=["raw", "qcow2"], default="raw")
    ap.add_argument("--speed-mib", type=int, default=0, help="job speed limit, MiB/s")
    ap.add_argument(
        "--seconds", type=int, default=10, help="without --speed-mib: a speed lasting about this"
    )
    ap.add_argument("--writers", type=int, default=2, help="concurrent NBD clients")
    ap.add_argument("--batch", type=int, default=16, help="requests per qemu-io process")
    ap.add_argument(
        "--discard-percent", type=float, default=5, help="percent of requests that are discards"
    )
    ap.add_argument("--seed", type=int, help="first seed (default: random)")
    ap.add_argument("--runs", type=int, default=1, help="seeds to run: seed, seed+1, ...")
    ap.add_argument(
        "--qsd", action="store_true", help="also run every seed against qemu-storage-daemon"
    )
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the images")
    args = ap.parse_args()
    if args.size_mib < 4 or args.writers < 1 or not 0 < args.fill <= 100:
        ap.error("need --size-mib >= 4, --writers >= 1 and 0 < --fill <= 100")
    first = args.seed if args.seed is not None else random.randrange(1 << 32)
    seeds = list(range(first, first + args.runs))
    base = args.dir or Path(tempfile.mkdtemp(prefix="point-in-time-"))
    base.mkdir(parents=True, exist_ok=True)
    kinds = ["blockd", "qsd"] if args.qsd else ["blockd"]
    results: dict[tuple[str, int], bool] = {}
    try:
        for seed in seeds:
            for kind in kinds:
                results[kind, seed] = one_run(kind, seed, args, base)
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    failed = [f"{k} seed {s}" for (k, s), ok in results.items() if not ok]
    print(
        f"seeds {seeds}: {len(results) - len(failed)}/{len(results)} runs passed"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
