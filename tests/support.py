"""Shared test support: real daemons (blockd and qemu-storage-daemon) on sockets in each test's
own temporary directory, QMP clients, and the qemu-img/qemu-io helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient

ROOT = Path(__file__).resolve().parent.parent


def run(
    *cmd: str | os.PathLike[str], check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing text output; fail loudly with its stderr."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} exited {res.returncode}: {res.stderr}{res.stdout}")
    return res


def qemu_img(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", *args, check=check)


def check_image(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``qemu-img check --output=json`` with its exit code as ``rc`` (0 clean, 2 corrupt,
    3 leaks only)."""
    res = qemu_img("check", "--output=json", path, check=False)
    out: dict[str, Any] = json.loads(res.stdout) if res.stdout.strip() else {}
    out["rc"] = res.returncode
    return out


def qemu_io(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    res = run("qemu-io", *args, check=check)
    if check and ("error" in res.stdout.lower() or "failed" in res.stdout.lower()):
        raise AssertionError(f"qemu-io {args}: {res.stdout}")
    return res


def _listening(path: Path) -> bool:
    """Whether a Unix socket listens at *path*, read from /proc/net/unix without connecting:
    qemu-storage-daemon's monitor serves one client at a time, and a probe connection that
    is still being torn down makes it drop the test's real connection."""
    want = str(path)
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == want and int(parts[3], 16) & 0x10000:
                return True
    return False


def wait_for_socket(path: Path, proc: subprocess.Popen[Any] | None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited early with {proc.returncode}")
        if path.exists() and _listening(path):
            return
        time.sleep(0.02)
    raise AssertionError(f"no socket at {path}")


T = TypeVar("T")


class Daemon:
    """A daemon process under test with its QMP socket."""

    def __init__(
        self, proc: subprocess.Popen[bytes], sock: Path, log: Path, kind: str = "blockd"
    ) -> None:
        self.proc = proc
        self.sock = sock
        self.log = log
        self.kind = kind

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def diagnose(self) -> str:
        """Which daemon stopped answering and what it was doing: its scheduler state and
        kernel wait channel, the machine's load, and for blockd every thread's Python stack
        (SIGUSR1 makes it write them to its log), then the log's tail."""
        pid = self.proc.pid
        out = [f"{self.kind} pid {pid}, returncode {self.proc.poll()}"]
        for name in ("/proc/loadavg", f"/proc/{pid}/wchan", "/proc/pressure/cpu"):
            with contextlib.suppress(OSError):
                out.append(f"{name}: {Path(name).read_text().strip()}")
        with contextlib.suppress(OSError):
            out.append(f"state: {Path(f'/proc/{pid}/stat').read_text().split()[2]}")
        if self.kind == "blockd" and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
        out.append(self.log_text()[-8000:])
        return "\n".join(out)

    def client(self, make: Callable[[Path], T]) -> T:
        """``make(self.sock)``, a client negotiated with this daemon; a timeout says what the
        daemon was doing, and a failure stops it."""
        try:
            with self.diagnosed():
                return make(self.sock)
        except BaseException:
            self.stop()
            raise

    @contextlib.contextmanager
    def diagnosed(self) -> Iterator[None]:
        """A timeout inside says which daemon it was and what it was doing."""
        try:
            yield
        except (TimeoutError, EOFError) as exc:
            raise AssertionError(f"{exc!r} waiting for {self.diagnose()}") from exc


def start_blockd(
    tmp: Path,
    *extra: str,
    name: str = "blockd",
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Daemon:
    sock = tmp / f"{name}.sock"
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "blockd", "--socket", str(sock), "--log-level", "debug", *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd or ROOT,
            env=env,
        )
    wait_for_socket(sock, proc)
    return Daemon(proc, sock, log)


def start_qsd(
    tmp: Path,
    *extra: str,
    name: str = "qsd",
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Daemon:
    sock = tmp / f"{name}.sock"
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                "qemu-storage-daemon",
                "--chardev",
                f"socket,path={sock},server=on,wait=off,id=mon0",
                "--monitor",
                "chardev=mon0",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )
    wait_for_socket(sock, proc)
    return Daemon(proc, sock, log, "qsd")


class EventLog:
    """Collects every event a client sees, in order."""

    def __init__(self, client: QMPClient) -> None:
        self.client = client
        self.events: list[dict[str, Any]] = []
        self._listener = client.events
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        async def pump() -> None:
            async for ev in self.client.events:
                self.events.append(dict(ev))

        self._task = asyncio.create_task(pump())

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for ev in self.events[seen:]:
                if pred(ev):
                    return ev
            seen = len(self.events)
            await asyncio.sleep(0.01)
        raise AssertionError(f"event not seen in {timeout}s; have {self.names()}")

    async def wait_job_status(self, job: str, status: str, timeout: float = 30) -> None:
        await self.wait_for(
            lambda e: (
                e["event"] == "JOB_STATUS_CHANGE"
                and e["data"]["id"] == job
                and e["data"]["status"] == status
            ),
            timeout,
        )

    def names(self) -> list[str]:
        out = []
        for e in self.events:
            if e["event"] == "JOB_STATUS_CHANGE":
                out.append(f"J:{e['data']['id']}:{e['data']['status']}")
            else:
                out.append(e["event"])
        return out

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


@contextlib.asynccontextmanager
async def connect(sock: Path) -> AsyncIterator[tuple[QMPClient, EventLog]]:
    client = QMPClient("test")
    await client.connect(str(sock))
    events = EventLog(client)
    events.start()
    try:
        yield client, events
    finally:
        await events.stop()
        with contextlib.suppress(Exception):
            await client.disconnect()
