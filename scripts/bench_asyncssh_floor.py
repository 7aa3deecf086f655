#!/usr/bin/env python3
"""What asyncssh alone costs to write over SFTP, without blockd around it.

The ssh issue asks blockd to write 2x as fast as qemu-storage-daemon. On loopback that is a
question of CPU, and this script measures the floor that no driver built on asyncssh can go
below: a bare asyncssh client on uvloop (the daemon's own loop) writes 1 GiB to the test lab's
sshd in the largest requests the server takes, *--depth* in flight, the way blockd's driver
sends them (one SFTP request per piece, straight to the handler), and prints its MiB/s, its
own CPU seconds per GiB and those of the server side (sshd's session process). Compare the
first two with blockd's daemon CPU in ``bench_ssh.py --modes write``: what blockd adds above
this floor is its own; the rest is the library's per-packet work (OpenSSH takes at most
32 KiB per SSH packet, so a GiB is 32768 packets, each built, encrypted and sent in Python).

Usage: scripts/bench_asyncssh_floor.py [--rounds 3] [--depth 8] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time

import asyncssh
import uvloop
from benchlib import ROOT, MiB, cpu_seconds_of, work_dir

sys.path.insert(0, str(ROOT / "tests" / "ssh"))
from sshlab import SshLab


async def one_round(lab: SshLab, size: int, depth: int) -> tuple[float, float, float]:
    """(MiB/s, client CPU s/GiB, server CPU s/GiB) of writing *size* bytes once."""
    conn = await asyncssh.connect(
        "127.0.0.1",
        lab.port,
        known_hosts=None,
        client_keys=[str(lab.client_key)],
        username=lab.user,
        compression_algs=None,
        encryption_algs=["aes128-gcm@openssh.com"],
        agent_path=None,
        config=None,
        window=8 * MiB,
        max_pktsize=256 * 1024,
    )
    try:
        sftp = await conn.start_sftp_client()
        piece = min(256 * 1024, sftp.limits.max_write_len or 256 * 1024)
        f = await sftp.open(str(lab.data / "floor.raw"), "wb", block_size=piece, max_requests=1)
        f.write_len = 0  # one request per call, as blockd's driver sends them
        data = os.urandom(piece)
        window = asyncio.Semaphore(depth)

        async def write(offset: int) -> None:
            try:
                await f.write(data, offset)
            finally:
                window.release()

        s0, c0, t0 = cpu_seconds_of(lab.session_pids()), time.process_time(), time.monotonic()
        tasks = []
        for offset in range(0, size, piece):
            await window.acquire()
            tasks.append(asyncio.ensure_future(write(offset)))
        await asyncio.gather(*tasks)
        await f.fsync()
        wall, cpu = time.monotonic() - t0, time.process_time() - c0
        server = cpu_seconds_of(lab.session_pids()) - s0
        await f.close()
    finally:
        conn.close()
        await conn.wait_closed()
    gib = size / (1024 * MiB)
    return size / MiB / wall, cpu / gib, server / gib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--depth", type=int, default=8, help="requests in flight (default 8)")
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args()
    if shutil.which("sshd") is None:
        print("bench_asyncssh_floor: needs OpenSSH's sshd", file=sys.stderr)
        return 2
    with work_dir(None, "bench-asyncssh-") as work:
        lab = SshLab(work / "lab")
        try:
            print(f"bare asyncssh {asyncssh.__version__} on uvloop, SFTP writes to 127.0.0.1")
            for r in range(args.rounds):
                mbs, client, server = uvloop.run(one_round(lab, args.size_mib * MiB, args.depth))
                print(
                    f"  round {r + 1}: {mbs:6.1f} MiB/s  client CPU {client:4.2f} s/GiB  "
                    f"sshd CPU {server:4.2f} s/GiB",
                    flush=True,
                )
        finally:
            lab.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
