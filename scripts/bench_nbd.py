#!/usr/bin/env python3
"""NBD export throughput: blockd against qemu-storage-daemon on the same image.

``qemu-img bench`` does 1 MiB (``--block-kib``) sequential reads and then writes, queue depth 8,
over a Unix socket, against a blockd export and a QSD export of identical copies of one raw
image. Runs alternate between the two daemons so drift of the machine (page cache, CPU
frequency) hits both alike. Prints each run, the medians and the blockd/QSD ratio.

Usage: scripts/bench_nbd.py [--size-mib 1024] [--count 2048] [--runs 3] [--block-kib 1024]
[--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


class Qmp:
    """Just enough QMP: negotiate, run a command, fail loudly on an error reply."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.buf = b""
        self._recv()
        self.run("qmp_capabilities")

    def _recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return dict(json.loads(line))

    def run(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": execute, "id": 1}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            reply = self._recv()
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"{execute}: {reply['error']['desc']}")
            return reply["return"]


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(1000):
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        if path.exists():
            return
        time.sleep(0.02)
    raise RuntimeError(f"no socket at {path}")


def start(kind: str, work: Path, image: Path) -> tuple[subprocess.Popen[bytes], str]:
    qmp_sock = work / f"{kind}.qmp"
    log = open(work / f"{kind}.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    if kind == "blockd":
        cmd = [sys.executable, "-m", "blockd", "--socket", str(qmp_sock), "--log-level", "warning"]
    else:
        cmd = ["qemu-storage-daemon", "--chardev",
               f"socket,path={qmp_sock},server=on,wait=off,id=m0", "--monitor", "chardev=m0"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wait_socket(qmp_sock, proc)
    q = Qmp(qmp_sock)
    q.run("blockdev-add", {"driver": "raw", "node-name": "disk",
                           "file": {"driver": "file", "filename": str(image)}})
    nbd_sock = work / f"{kind}.nbd"
    q.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}})
    q.run("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk",
                               "writable": True})
    q.sock.close()
    return proc, f"nbd+unix:///disk?socket={nbd_sock}"


def bench(uri: str, write: bool, count: int, block_kib: int = 1024) -> float:
    """MiB/s of one qemu-img bench run."""
    cmd = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", "8", "-s", f"{block_kib}K"]
    if write:
        cmd.append("-w")
    res = subprocess.run([*cmd, uri], capture_output=True, text=True, check=True)
    m = re.search(r"Run completed in ([0-9.]+) seconds", res.stdout)
    if m is None:
        raise RuntimeError(f"unexpected qemu-img bench output: {res.stdout}{res.stderr}")
    return count * block_kib / 1024 / float(m.group(1))


def fill(path: Path, size: int) -> None:
    block = bytes(range(256)) * (MiB // 256)
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    ap.add_argument("--count", type=int, default=2048, help="requests per run (default 2048)")
    ap.add_argument("--runs", type=int, default=3, help="runs per daemon and mode (default 3)")
    ap.add_argument("--dir", help="work directory (default: a new temporary one)")
    ap.add_argument("--block-kib", type=int, default=1024,
                    help="request size in KiB (default 1024; 64 shows per-request cost)")
    args = ap.parse_args()
    if shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-img") is None:
        print("bench_nbd: needs qemu-storage-daemon and qemu-img", file=sys.stderr)
        return 2
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-nbd-"))
    work.mkdir(parents=True, exist_ok=True)
    images = {k: work / f"{k}.raw" for k in ("blockd", "qsd")}
    fill(images["blockd"], args.size_mib * MiB)
    shutil.copyfile(images["blockd"], images["qsd"])
    procs = {}
    uris = {}
    try:
        for kind in ("blockd", "qsd"):
            procs[kind], uris[kind] = start(kind, work, images[kind])
        results: dict[tuple[str, str], list[float]] = {}
        print(f"qemu-img bench: {args.block_kib} KiB sequential, depth 8, {args.count} requests "
              "per run, "
              f"{args.size_mib} MiB raw image, Unix socket")
        for mode in ("read", "write"):
            for run in range(args.runs):
                for kind in ("blockd", "qsd") if run % 2 == 0 else ("qsd", "blockd"):
                    mbs = bench(uris[kind], mode == "write", args.count, args.block_kib)
                    results.setdefault((kind, mode), []).append(mbs)
                    print(f"  {mode:5} run {run + 1} {kind:6} {mbs:8.1f} MiB/s", flush=True)
        print()
        for mode in ("read", "write"):
            b = statistics.median(results[("blockd", mode)])
            q = statistics.median(results[("qsd", mode)])
            print(f"{mode:5}: blockd {b:8.1f} MiB/s   QSD {q:8.1f} MiB/s   "
                  f"blockd/QSD = {b / q:.2f}")
    finally:
        for p in procs.values():
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
