"""Helpers for the bitmap, backup and transaction tests: a blocking QMP session that keeps
every event, scenario runners that play the same steps against blockd and qemu-storage-daemon,
image builders, and the NBD writer used for point-in-time checks."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from rawclient import RawQmp
from support import Daemon, qemu_img, qemu_io, start_blockd, start_qsd

MiB = 1024 * 1024


class Session:
    """A negotiated QMP connection that records events in arrival order."""

    def __init__(self, sock: Path, timeout: float = 60) -> None:
        self.raw = RawQmp(sock, timeout=timeout)
        self.raw.negotiate()
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        self.raw.close()

    def _recv(self) -> dict[str, Any]:
        msg = self.raw.recv()
        if "event" in msg:
            self.events.append(msg)
        return msg

    def cmd(self, execute: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": execute}
        if args is not None:
            msg["arguments"] = args
        self.raw.send(msg)
        self.events.append({"event": "->", "data": {"cmd": execute}})
        while True:
            m = self._recv()
            if "event" not in m:
                self.events.append({"event": "<-", "data": {"ok": "return" in m}})
                return m

    def ok(self, execute: str, args: dict[str, Any] | None = None) -> Any:
        r = self.cmd(execute, args)
        assert "return" in r, f"{execute} {args}: {r}"
        return r["return"]

    def err(self, execute: str, args: dict[str, Any] | None = None) -> str:
        r = self.cmd(execute, args)
        assert "error" in r, f"{execute} {args} unexpectedly succeeded"
        return str(r["error"]["desc"])

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        for ev in self.events:
            if pred(ev):
                return ev
        deadline = time.monotonic() + timeout
        self.raw.sock.settimeout(0.2)
        try:
            while time.monotonic() < deadline:
                try:
                    m = self._recv()
                except TimeoutError:
                    continue
                if "event" in m and pred(m):
                    return m
        finally:
            self.raw.sock.settimeout(60)
        raise AssertionError(f"event not seen; have {self.names()}")

    def wait_job(self, job: str, status: str, timeout: float = 60) -> None:
        self.wait(
            lambda e: (
                e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {"id": job, "status": status}
            ),
            timeout,
        )

    def drain(self, quiet: float = 0.2) -> None:
        """Collect events until none arrived for *quiet* seconds."""
        self.raw.sock.settimeout(quiet)
        try:
            while True:
                try:
                    self._recv()
                except TimeoutError:
                    return
        finally:
            self.raw.sock.settimeout(60)

    def names(self, with_markers: bool = False) -> list[str]:
        """Events as short strings; BLOCK_JOB_* with their id, JOB_STATUS_CHANGE as J:id:st."""
        out = []
        for e in self.events:
            name, data = e["event"], e.get("data", {})
            if name in ("->", "<-"):
                if with_markers:
                    out.append(f"{name}{data.get('cmd', data.get('ok'))}")
                continue
            if name == "JOB_STATUS_CHANGE":
                out.append(f"J:{data['id']}:{data['status']}")
            elif name.startswith("BLOCK_JOB_"):
                extra = ""
                if name == "BLOCK_JOB_ERROR":
                    extra = f":{data['operation']}:{data['action']}"
                elif "error" in data:
                    extra = f":error={data['error']}"
                out.append(f"{name}:{data.get('device', data.get('id'))}{extra}")
            else:
                out.append(name)
        return out

    def bitmaps(self, node: str) -> list[dict[str, Any]]:
        for n in self.ok("query-named-block-nodes", {"flat": True}):
            if n["node-name"] == node:
                return list(n.get("dirty-bitmaps", []))
        raise AssertionError(f"no node {node}")

    def bitmap(self, node: str, name: str) -> dict[str, Any]:
        for b in self.bitmaps(node):
            if b.get("name") == name:
                return b
        raise AssertionError(f"no bitmap {name} on {node}")


def start(kind: str, tmp: Path) -> Daemon:
    return start_blockd(tmp, name="blockd") if kind == "blockd" else start_qsd(tmp, name="qsd")


def _pattern_writes(path: Path, fmt: str, writes: Sequence[tuple[int, int, int]]) -> None:
    """``write -P pattern off len`` for each write, in one qemu-io run."""
    if writes:
        cmds: list[str] = []
        for pattern, off, n in writes:
            cmds += ["-c", f"write -P {pattern} {off} {n}"]
        qemu_io("-f", fmt, *cmds, path)


def raw_image(path: Path, size: int, writes: Sequence[tuple[int, int, int]] = ()) -> Path:
    """A sparse raw image with ``write -P pattern off len`` applied for each write."""
    qemu_img("create", "-f", "raw", path, str(size))
    _pattern_writes(path, "raw", writes)
    return path


def qcow2_image(
    path: Path,
    size: int,
    writes: Sequence[tuple[int, int, int]] = (),
    backing: Path | None = None,
) -> Path:
    args = ["create", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2" if str(backing).endswith("qcow2") else "raw"]
    qemu_img(*args, path, str(size))
    _pattern_writes(path, "qcow2", writes)
    return path


def compare(a: Path, b: Path, fmt_a: str = "raw", fmt_b: str = "raw") -> bool:
    res = qemu_img("compare", "-U", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    return res.returncode == 0


def raw_node(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "driver": "raw",
        "node-name": name,
        "file": {"driver": "file", "filename": str(path)},
        **extra,
    }


def qcow2_node(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {**raw_node(name, path, **extra), "driver": "qcow2"}


def completed(s: Session, job: str) -> dict[str, Any]:
    """The data of *job*'s BLOCK_JOB_COMPLETED."""
    return next(
        e["data"]
        for e in s.events
        if e["event"] == "BLOCK_JOB_COMPLETED" and e["data"]["device"] == job
    )


def blkdebug_raw_node(name: str, path: Path, rules: list[dict[str, Any]]) -> dict[str, Any]:
    """raw over blkdebug over file: requests fail as *rules* say."""
    return {
        "driver": "raw",
        "node-name": name,
        "file": {
            "driver": "blkdebug",
            "inject-error": rules,
            "image": {"driver": "file", "filename": str(path)},
        },
    }


def fresh_dirs(tmp: Path, build: Callable[[Path], None]) -> dict[str, Path]:
    """One directory per daemon, each built identically by *build*."""
    out = {}
    for kind in ("blockd", "qsd"):
        d = tmp / kind
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        build(d)
        out[kind] = d
    return out


def run_both(
    tmp: Path, build: Callable[[Path], None], scenario: Callable[[Session, Path], Any]
) -> dict[str, Any]:
    """Play *scenario* against blockd and QSD on identical image sets; returns each result."""
    dirs = fresh_dirs(tmp, build)
    results: dict[str, Any] = {}
    for kind, d in dirs.items():
        daemon = start(kind, d)
        s = daemon.client(Session)
        try:
            with daemon.diagnosed():
                results[kind] = scenario(s, d)
        finally:
            s.close()
            daemon.stop()
    return results


def norm(obj: Any, d: Path) -> Any:
    """Replace the scenario directory by $DIR so replies of both daemons compare equal."""
    return json.loads(json.dumps(obj).replace(str(d), "$DIR"))


def nbd_write(sock: Path, export: str, pattern: int, offset: int, nbytes: int) -> None:
    qemu_io(
        "-f",
        "raw",
        "-c",
        f"write -P {pattern} {offset} {nbytes}",
        f"nbd+unix:///{export}?socket={sock}",
    )


@pytest.fixture
def qmp_session(tmp_path: Path) -> Any:
    """A blockd daemon in tmp_path and a negotiated :class:`Session` to it."""
    daemon = start_blockd(tmp_path)
    s = Session(daemon.sock)
    try:
        yield s
    finally:
        s.close()
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
