#!/usr/bin/env python3
"""ssh protocol throughput: blockd against qemu-storage-daemon through the same sshd.

A throwaway OpenSSH server on 127.0.0.1 (tests/ssh/sshlab.py: own host keys, own client key,
passwd entry wrapped with nss_wrapper, the real ~/.ssh never read) serves one remote file per
daemon. Each daemon opens it as raw-on-ssh and exports it over NBD; ``qemu-img bench`` then
reads the whole file and writes it again, 1 MiB requests at depth 8. Rounds alternate which
daemon goes first so drift of the machine hits both alike. Prints each run, the medians, the
blockd/QSD ratios and each daemon's peak RSS (VmHWM), then checks the written data.

Usage: scripts/bench_ssh.py [--size-mib 256] [--runs 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import ROOT, Qmp, export_nbd, img_bench, random_image, same, start, stop

sys.path.insert(0, str(ROOT / "tests" / "ssh"))
from sshlab import SshLab


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process *pid* so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256, help="remote file size (default 256)")
    ap.add_argument("--runs", type=int, default=3, help="rounds per daemon and mode (default 3)")
    ap.add_argument("--dir", help="work directory (default: a new temporary one)")
    args = ap.parse_args()
    if shutil.which("qemu-storage-daemon") is None or shutil.which("sshd") is None:
        print("bench_ssh: needs qemu-storage-daemon and OpenSSH's sshd", file=sys.stderr)
        return 2
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-ssh-"))
    work.mkdir(parents=True, exist_ok=True)
    lab = SshLab(work / "lab")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    uris: dict[str, str] = {}
    files = {k: lab.data / f"{k}.raw" for k in ("blockd", "qsd")}
    count = args.size_mib
    try:
        random_image(files["blockd"], args.size_mib)
        shutil.copyfile(files["blockd"], files["qsd"])
        for kind in ("blockd", "qsd"):
            procs[kind], sock = start(kind, work, env=lab.env())
            q = Qmp(sock)
            ssh = lab.node("disk-ssh", files[kind])
            q.cmd("blockdev-add", {"driver": "raw", "node-name": "disk", "file": ssh})
            uris[kind] = export_nbd(q, "disk", work / f"{kind}.nbd")
            q.close()
        print(
            f"qemu-img bench over NBD onto raw-on-ssh: 1 MiB sequential, depth 8, "
            f"{args.size_mib} MiB per run, sshd on 127.0.0.1"
        )
        results: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        for mode in ("read", "write"):
            opts = ["-c", str(count), "-d", "8", "-s", "1M"]
            if mode == "write":
                opts += ["-w", "--pattern=90"]
            for run in range(args.runs):
                for kind in ("blockd", "qsd") if run % 2 == 0 else ("qsd", "blockd"):
                    c0 = cpu_seconds(procs[kind].pid)
                    mbs = args.size_mib / img_bench(uris[kind], *opts)
                    used = cpu_seconds(procs[kind].pid) - c0
                    results.setdefault((kind, mode), []).append(mbs)
                    cpu.setdefault((kind, mode), []).append(used)
                    print(
                        f"  {mode:5} run {run + 1} {kind:6} {mbs:8.1f} MiB/s  "
                        f"daemon CPU {used:5.2f} s",
                        flush=True,
                    )
        print()
        for mode in ("read", "write"):
            b = statistics.median(results[("blockd", mode)])
            q_ = statistics.median(results[("qsd", mode)])
            print(
                f"{mode:5}: blockd {b:8.1f} MiB/s   QSD {q_:8.1f} MiB/s   blockd/QSD = {b / q_:.2f}"
            )
        for kind, p in procs.items():
            print(f"peak RSS {kind:6} {peak_rss_mib(p.pid):7.1f} MiB")
        for p in procs.values():
            stop(p)
        procs.clear()
        ok = same(files["blockd"], files["qsd"], "raw")
        print(f"written data identical in both remote files: {ok}")
        return 0 if ok else 1
    finally:
        for p in procs.values():
            stop(p)
        lab.stop()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
