"""What the scripts under scripts/ share: start and stop blockd or qemu-storage-daemon, a
blocking QMP client, and thin wrappers around qemu-img.

The scripts run as ``.venv/bin/python scripts/X.py``, which puts scripts/ on ``sys.path``, so
``import benchlib`` works from any of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class Qmp:
    """Blocking QMP client that keeps every event it sees until wait_event() takes it."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(600)
        self.sock.connect(str(path))
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self._recv()
        self.cmd("qmp_capabilities")

    def _recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("daemon closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return dict(json.loads(line))

    def cmd(self, execute: str, args: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": execute}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            m = self._recv()
            if "event" in m:
                self.events.append(m)
                continue
            if "error" in m:
                raise RuntimeError(f"{execute}: {m['error']['desc']}")
            return m["return"]

    def wait_event(self, name: str) -> dict[str, Any]:
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name:
                    return self.events.pop(i)
            self.events.append(self._recv())

    def close(self) -> None:
        self.sock.close()


def start(
    kind: str, d: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``blockd`` or ``qsd`` with its QMP monitor on ``d/KIND.qmp`` and its output in
    ``d/KIND.log``; returns the process and the monitor socket once it exists. blockd logs at
    $BLOCKD_LOG (default warning; debug puts job timings in blockd.log)."""
    sock = d / f"{kind}.qmp"
    if sock.exists():
        sock.unlink()
    if kind == "blockd":
        level = os.environ.get("BLOCKD_LOG", "warning")
        cmd = [sys.executable, "-m", "blockd", "--socket", str(sock), "--log-level", level]
    else:
        cmd = [
            "qemu-storage-daemon",
            "--chardev",
            f"socket,path={sock},server=on,wait=off,id=m",
            "--monitor",
            "chardev=m",
        ]
    with open(d / f"{kind}.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{kind} did not start; see {d / f'{kind}.log'}")
        time.sleep(0.02)
    return proc, sock


def connect(sock: Path) -> Qmp:
    """A QMP session, retried while the daemon is not listening yet (its socket file
    appears a moment before it accepts)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return Qmp(sock)
        except (ConnectionRefusedError, ConnectionResetError, EOFError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def serve(
    kind: str, work: Path, spec: dict[str, Any], writable: bool
) -> tuple[subprocess.Popen[bytes], str]:
    """Start *kind*, add the node *spec* and export it over NBD on ``work/KIND.nbd``; the
    process and the export's URI."""
    proc, sock = start(kind, work)
    try:
        q = connect(sock)
        q.cmd("blockdev-add", spec)
        uri = export_nbd(q, spec["node-name"], work / f"{kind}.nbd", writable)
        q.close()
    except BaseException:
        stop(proc)
        raise
    return proc, uri


def stop(proc: subprocess.Popen[bytes], wait: float = 0) -> None:
    """Give the daemon *wait* seconds to exit (after a ``quit``), then terminate it, and kill
    it if it still runs 20 s later."""
    try:
        proc.wait(timeout=wait)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process *pid* so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds_of(pids: Iterable[int]) -> float:
    """The CPU time of *pids* together, leaving out any that has already exited."""
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue
    return total


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def touch_memory(d: Path, mib: int = 1280) -> None:
    """Write and delete a *mib* MiB scratch file in *d*, right before a timed run.

    On a VM that gives freed guest memory back to its host (free page reporting, DAMON
    reclaim), the first process to fill the page cache after a pause pays the host's page
    faults: 2-3 s more per GiB written, seen for either daemon, depending only on what ran
    before it (a blockd run after a QSD run paid it every time, a run after its own kind
    did not). Touching that much memory first gives every run, of either daemon, the same
    start."""
    scratch = d / "touch-memory.tmp"
    chunk = b"\0" * MiB
    with open(scratch, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
    scratch.unlink()


def timed_job(
    kind: str, d: Path, nodes: list[dict[str, Any]], job: Callable[[Qmp], None]
) -> tuple[float, float]:
    """Start *kind* in *d*, add *nodes*, then time *job* (it starts a block job and does what
    the job needs, READY and complete for a mirror) up to BLOCK_JOB_COMPLETED. Returns the
    seconds and the daemon's peak RSS in MiB; raises when the job failed."""
    proc, sock = start(kind, d)
    quit_sent = False
    try:
        q = Qmp(sock)
        for opts in nodes:
            q.cmd("blockdev-add", opts)
        touch_memory(d)
        t0 = time.perf_counter()
        job(q)
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        elapsed = time.perf_counter() - t0
        if "error" in ev["data"]:
            raise RuntimeError(f"{kind}: job failed: {ev['data']['error']}")
        rss = peak_rss_mib(proc.pid)
        q.cmd("quit")
        quit_sent = True
    finally:
        stop(proc, 30 if quit_sent else 0)
    return elapsed, rss


def node(name: str, path: Path, fmt: str, **extra: Any) -> dict[str, Any]:
    """blockdev-add arguments of a *fmt* node over a file."""
    return {
        "driver": fmt,
        "node-name": name,
        "file": {"driver": "file", "filename": str(path)},
        **extra,
    }


def export_nbd(q: Qmp, node_name: str, path: Path, writable: bool = True) -> str:
    """Export *node_name* over NBD on the Unix socket *path* (export id: the node name);
    returns the URI."""
    q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(path)}}})
    q.cmd(
        "block-export-add",
        {"type": "nbd", "id": node_name, "node-name": node_name, "writable": writable},
    )
    return f"nbd+unix:///{node_name}?socket={path}"


# -- tools --------------------------------------------------------------------------------------
def run(*cmd: str | Path) -> str:
    """stdout of *cmd*; raises with its stderr when it fails."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {res.returncode}: {res.stderr}")
    return res.stdout


def make_target(path: Path, fmt: str, size: int) -> None:
    """A fresh empty *fmt* image of *size* bytes at *path* (replacing any file there)."""
    if path.exists():
        path.unlink()
    run("qemu-img", "create", "-q", "-f", fmt, path, str(size))


def same(a: Path, b: Path, fmt: str) -> bool:
    """Whether two *fmt* images hold the same data (``qemu-img compare``)."""
    res = subprocess.run(
        ["qemu-img", "compare", "-q", "-U", "-f", fmt, "-F", fmt, str(a), str(b)],
        capture_output=True,
        text=True,
    )
    if res.returncode not in (0, 1):
        raise RuntimeError(f"qemu-img compare {a} {b}: {res.stderr}")
    return res.returncode == 0


def random_image(path: Path, size_mib: int) -> Path:
    """A raw image of *size_mib* MiB of random data."""
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MiB))
    return path


def img_bench(uri: str, *opts: str) -> float:
    """Seconds one ``qemu-img bench -f raw OPTS URI`` run took (as qemu-img reports it)."""
    res = subprocess.run(
        ["qemu-img", "bench", "-f", "raw", *opts, uri], capture_output=True, text=True
    )
    m = re.search(r"Run completed in ([0-9.]+) seconds", res.stdout)
    if res.returncode != 0 or m is None:
        raise RuntimeError(f"qemu-img bench failed: {res.stdout}{res.stderr}")
    return float(m.group(1))


@contextlib.contextmanager
def work_dir(given: Path | None, prefix: str, keep: bool = False) -> Iterator[Path]:
    """The benchmark's directory: *given* (kept), or a new temporary one removed at the end
    unless *keep*."""
    d = given or Path(tempfile.mkdtemp(prefix=prefix))
    d.mkdir(parents=True, exist_ok=True)
    try:
        yield d
    finally:
        if given is None and not keep:
            shutil.rmtree(d, ignore_errors=True)


def header() -> None:
    print(
        f"{'case':34} {'blockd s':>9} {'qsd s':>7} {'blockd MiB/s':>13} "
        f"{'qsd MiB/s':>10} {'ratio':>6} {'blockd RSS':>11} {'qsd RSS':>8}"
    )


def report(
    label: str, rounds: int, one: Callable[[str], tuple[float, float]], mib: int = 1024
) -> None:
    """Run *one* for blockd and QSD alternately, *rounds* times; print the best times, the
    throughput of *mib* MiB, the ratio (QSD time / blockd time) and each one's peak RSS."""
    best = {"blockd": float("inf"), "qsd": float("inf")}
    rss = {"blockd": 0.0, "qsd": 0.0}
    for _ in range(rounds):
        for kind in ("blockd", "qsd"):
            t, r = one(kind)
            best[kind] = min(best[kind], t)
            rss[kind] = max(rss[kind], r)
    b, q = best["blockd"], best["qsd"]
    print(
        f"{label:34} {b:9.2f} {q:7.2f} {mib / b:13.0f} {mib / q:10.0f} "
        f"{q / b:6.2f} {rss['blockd']:8.0f} MiB {rss['qsd']:4.0f} MiB",
        flush=True,
    )
