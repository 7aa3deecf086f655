#!/usr/bin/env python3
"""ssh protocol throughput: blockd against qemu-storage-daemon through the same sshd.

A throwaway OpenSSH server on 127.0.0.1 (tests/ssh/sshlab.py: own host keys, own client key,
passwd entry wrapped with nss_wrapper, the real ~/.ssh never read) serves one remote file per
daemon. Each daemon opens it as raw-on-ssh. ``--via nbd`` (default) exports that node over NBD
and ``qemu-img bench`` reads the whole file and writes it again, 1 MiB requests at depth 8;
``--via backup`` reads it with a full backup into a null-co node and writes it with a full
backup from a local raw file (the copy engine's parallel tasks). Rounds alternate which daemon
goes first so drift of the machine hits both alike. Prints each run with the daemon's CPU time
and sshd's (the server side of that run: decryption and the SFTP server),
the medians, the blockd/QSD ratios and each daemon's peak RSS (VmHWM), then checks the data.

``--delay-ms D`` puts a relay between the daemons and sshd that holds every chunk for D ms in
each direction, so the ssh traffic sees a round trip of 2*D ms as across a LAN or WAN (loopback
answers in microseconds, which hides the cost of waiting for each request). The relay is a
separate process, and both daemons go through it.

Usage: scripts/bench_ssh.py [--size-mib 256] [--runs 3] [--via nbd|backup] [--delay-ms D]
[--dir DIR] [--modes read,write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (
    ROOT,
    MiB,
    Qmp,
    cpu_seconds,
    cpu_seconds_of,
    export_nbd,
    img_bench,
    node,
    peak_rss_mib,
    random_image,
    same,
    start,
    stop,
)

sys.path.insert(0, str(ROOT / "tests" / "ssh"))
from sshlab import SshLab, free_port


async def relay(listen: int, target: int, delay: float) -> None:
    """Forward 127.0.0.1:*listen* to 127.0.0.1:*target*, each chunk *delay* s late."""
    loop = asyncio.get_running_loop()

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def pump() -> None:
            while True:
                due, data = await queue.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    w.close()
                    return
                w.write(data)
                await w.drain()

        task = asyncio.create_task(pump())
        while True:
            data = await r.read(1 << 18)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await task

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        r2, w2 = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(r, w2), pipe(r2, w), return_exceptions=True)

    server = await asyncio.start_server(serve, "127.0.0.1", listen)
    await server.serve_forever()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256, help="remote file size (default 256)")
    ap.add_argument("--runs", type=int, default=3, help="rounds per daemon and mode (default 3)")
    ap.add_argument("--via", choices=("nbd", "backup"), default="nbd", help="(default nbd)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay (default 0)")
    ap.add_argument("--relay", nargs=3, type=float, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help="work directory (default: a new temporary one)")
    ap.add_argument(
        "--modes", default="read,write", help="which passes, comma-separated (default read,write)"
    )
    args = ap.parse_args()
    modes = [m for m in ("read", "write") if m in args.modes.split(",")]
    if not modes or set(args.modes.split(",")) - set(modes):
        ap.error(f"--modes: read, write or both, not {args.modes!r}")
    if args.relay:
        asyncio.run(relay(int(args.relay[0]), int(args.relay[1]), args.relay[2] / 1000))
        return 0
    if shutil.which("qemu-storage-daemon") is None or shutil.which("sshd") is None:
        print("bench_ssh: needs qemu-storage-daemon and OpenSSH's sshd", file=sys.stderr)
        return 2
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-ssh-"))
    work.mkdir(parents=True, exist_ok=True)
    lab = SshLab(work / "lab")
    relay_proc = None
    procs: dict[str, subprocess.Popen[bytes]] = {}
    qmps: dict[str, Qmp] = {}
    uris: dict[str, str] = {}
    files = {k: lab.data / f"{k}.raw" for k in ("blockd", "qsd")}
    local = work / "local.raw"
    size = args.size_mib * MiB
    count = args.size_mib
    jobs = iter(range(10**6))
    try:
        random_image(files["blockd"], args.size_mib)
        shutil.copyfile(files["blockd"], files["qsd"])
        if args.via == "backup":
            random_image(local, args.size_mib)
        server = lab.server()
        if args.delay_ms:
            port = free_port()
            relay_proc = subprocess.Popen(
                [sys.executable, __file__, "--relay", str(port), str(lab.port), str(args.delay_ms)]
            )
            name = f"[127.0.0.1]:{port}"
            lab.write_known_hosts([*lab.known_hosts_lines(), lab.known_line("ed25519", name)])
            server = {"host": "127.0.0.1", "port": str(port)}
            time.sleep(0.5)
        for kind in ("blockd", "qsd"):
            procs[kind], sock = start(kind, work, env=lab.env())
            q = qmps[kind] = Qmp(sock)
            ssh = {**lab.node("disk-ssh", files[kind]), "server": server}
            q.cmd("blockdev-add", {"driver": "raw", "node-name": "disk", "file": ssh})
            if args.via == "nbd":
                uris[kind] = export_nbd(q, "disk", work / f"{kind}.nbd")
            else:
                q.cmd("blockdev-add", node("local", local, "raw", **{"read-only": True}))
                q.cmd("blockdev-add", {"driver": "null-co", "node-name": "sink", "size": size})

        def once(kind: str, mode: str) -> float:
            """Seconds one pass over the file took."""
            if args.via == "nbd":
                opts = ["-c", str(count), "-d", "8", "-s", "1M"]
                opts += ["-w", "--pattern=90"] if mode == "write" else []
                return img_bench(uris[kind], *opts)
            q = qmps[kind]
            src, dst = ("disk", "sink") if mode == "read" else ("local", "disk")
            job = f"j{next(jobs)}"
            t0 = time.monotonic()
            q.cmd("blockdev-backup", {"job-id": job, "device": src, "target": dst, "sync": "full"})
            ev = q.wait_event("BLOCK_JOB_COMPLETED")
            if ev["data"].get("error"):
                raise RuntimeError(f"{kind} backup failed: {ev['data']['error']}")
            return time.monotonic() - t0

        what = (
            "qemu-img bench over NBD onto raw-on-ssh: 1 MiB sequential, depth 8"
            if args.via == "nbd"
            else "full backups from raw-on-ssh to null-co (read) and from local raw (write)"
        )
        delay = f", {args.delay_ms} ms each way" if args.delay_ms else ""
        print(f"{what}, {args.size_mib} MiB per run, sshd on 127.0.0.1{delay}")
        results: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        for mode in modes:
            for run in range(args.runs):
                for kind in ("blockd", "qsd") if run % 2 == 0 else ("qsd", "blockd"):
                    c0, s0 = cpu_seconds(procs[kind].pid), cpu_seconds_of(lab.session_pids())
                    mbs = args.size_mib / once(kind, mode)
                    used = cpu_seconds(procs[kind].pid) - c0
                    server = cpu_seconds_of(lab.session_pids()) - s0
                    results.setdefault((kind, mode), []).append(mbs)
                    cpu.setdefault((kind, mode), []).append(used)
                    print(
                        f"  {mode:5} run {run + 1} {kind:6} {mbs:8.1f} MiB/s  "
                        f"daemon CPU {used:5.2f} s  sshd CPU {server:5.2f} s",
                        flush=True,
                    )
        print()
        for mode in modes:
            b = statistics.median(results[("blockd", mode)])
            q_ = statistics.median(results[("qsd", mode)])
            print(
                f"{mode:5}: blockd {b:8.1f} MiB/s   QSD {q_:8.1f} MiB/s   blockd/QSD = {b / q_:.2f}"
            )
        for kind, p in procs.items():
            print(f"peak RSS {kind:6} {peak_rss_mib(p.pid):7.1f} MiB")
        for q in qmps.values():
            q.close()
        qmps.clear()
        for p in procs.values():
            stop(p)
        procs.clear()
        ok = same(files["blockd"], files["qsd"], "raw")
        if args.via == "backup":
            ok = ok and same(files["blockd"], local, "raw")
        print(f"written data identical in both remote files: {ok}")
        return 0 if ok else 1
    finally:
        for q in qmps.values():
            q.close()
        for p in procs.values():
            stop(p)
        if relay_proc is not None:
            relay_proc.terminate()
            relay_proc.wait()
        lab.stop()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
