"""The blockd-backup tests' lab: a daemon (blockd or qemu-storage-daemon, the same tests run on
both) serving qcow2 disks that are exported writable over NBD, writes over NBD as a guest
would make them, copies of the disks taken over NBD at chosen moments, and the tool itself run
as a separate process, exactly as a user runs it.

The lab talks QMP in short sessions only (connect, a few commands, disconnect): the tool must
get the monitor while the test is not using it, since qemu-storage-daemon serves one client
at a time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from diffsupport import Session
from support import ROOT, Daemon, qemu_img, qemu_io, start_blockd, start_qsd

from blockd.tools.backup.cli import main

MiB = 1024 * 1024
TOOL = [sys.executable, "-m", "blockd.tools.backup"]
KINDS = ["blockd", "qsd"]


class Lab:
    def __init__(self, tmp: Path, kind: str) -> None:
        self.tmp = tmp
        self.kind = kind
        self.dir = tmp / "backups"
        self.nbd = tmp / "nbd.sock"
        self.daemon: Daemon | None = None
        self.disks: dict[str, Path] = {}
        self.rng = random.Random(f"{kind}-{tmp.name}")
        self.copies: dict[int, dict[str, Path]] = {}

    # -- the daemon ------------------------------------------------------------------------
    @property
    def sock(self) -> Path:
        assert self.daemon is not None
        return self.daemon.sock

    def start(self) -> None:
        if self.kind == "blockd":
            self.daemon = start_blockd(self.tmp)
        else:
            self.daemon = start_qsd(self.tmp)
        self.qmp("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(self.nbd)}}})
        for name in self.disks:
            self.attach(name)

    def kill9(self) -> None:
        assert self.daemon is not None
        self.daemon.proc.send_signal(signal.SIGKILL)
        self.daemon.proc.wait()
        self.nbd.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.daemon is not None:
            rc = self.daemon.stop()
            assert rc == 0, self.daemon.log_text()[-3000:]
            self.daemon = None

    def qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        s = Session(self.sock)
        try:
            return s.ok(cmd, args)
        finally:
            s.close()

    def qmp_err(self, cmd: str, args: dict[str, Any] | None = None) -> str:
        s = Session(self.sock)
        try:
            return s.err(cmd, args)
        finally:
            s.close()

    # -- disks -----------------------------------------------------------------------------
    def add_disk(self, name: str, size: int, fill: int = 2 * MiB) -> None:
        """A qcow2 disk with *fill* bytes of data at its start, attached and exported."""
        path = self.tmp / f"{name}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", path, str(size))
        if fill:
            qemu_io("-f", "qcow2", "-c", f"write -P 0x5a 0 {fill}", path)
        self.disks[name] = path
        if self.daemon is not None:
            self.attach(name)

    def attach(self, name: str) -> None:
        node = {
            "driver": "qcow2",
            "node-name": name,
            "file": {"driver": "file", "filename": str(self.disks[name])},
        }
        self.qmp("blockdev-add", node)
        self.qmp(
            "block-export-add",
            {"type": "nbd", "id": f"e-{name}", "node-name": name, "writable": True},
        )

    def detach(self, name: str) -> None:
        self.qmp("block-export-del", {"id": f"e-{name}"})
        self.qmp("blockdev-del", {"node-name": name})

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.nbd}"

    def write_random(self, name: str, count: int = 12, max_len: int = 512 * 1024) -> None:
        """*count* random writes over NBD: patterns, unaligned ones, write-zeroes."""
        size = self.size_of(name)
        cmds: list[str] = []
        for _ in range(count):
            n = self.rng.randrange(1, max_len)
            off = self.rng.randrange(0, size - n)
            if self.rng.random() < 0.2:
                cmds += ["-c", f"write -z {off} {n}"]
            else:
                cmds += ["-c", f"write -P {self.rng.randrange(1, 255)} {off} {n}"]
        qemu_io("-f", "raw", *cmds, self.uri(name))

    def size_of(self, name: str) -> int:
        info = json.loads(qemu_img("info", "-U", "--output=json", self.disks[name]).stdout)
        return int(info["virtual-size"])

    def snapshot(self, key: int) -> dict[str, Path]:
        """Copies of every disk now, read over NBD (no writer is active)."""
        out = {}
        for name in self.disks:
            copy = self.tmp / f"copy-{key}-{name}.raw"
            qemu_img("convert", "-f", "raw", "-O", "raw", self.uri(name), copy)
            out[name] = copy
        self.copies[key] = out
        return out

    # -- the tool --------------------------------------------------------------------------
    def tool(
        self,
        *args: str | Path,
        ok: bool = True,
        process: bool = False,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run blockd-backup with *args*. In this process by default (the same ``main`` the
        console script calls, minus half a second of interpreter start-up per call); as a
        separate process with *process* (for signals, terminals, concurrency)."""
        argv = [str(a) for a in args]
        if process:
            res = subprocess.run(
                [*TOOL, *argv],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=120,
                env={**os.environ, **(env or {})},
            )
        else:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(argv)
            res = subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())
        if ok and res.returncode != 0:
            raise AssertionError(
                f"blockd-backup {argv} exited {res.returncode}\n{res.stderr}{res.stdout}"
            )
        return res

    def night(self, key: int, *extra: str | Path, write: bool = True) -> str:
        """A night: random writes (unless *write* is false), a copy of the disks kept as
        *key*, a backup run; its stdout."""
        if write:
            for name in self.disks:
                self.write_random(name)
        self.snapshot(key)
        return self.backup(*extra).stdout

    def assert_same(self, image: str | Path, copy: Path, fmt: str = "raw") -> None:
        res = qemu_img("compare", "-f", fmt, "-F", "raw", image, copy, check=False)
        assert res.returncode == 0, f"{image} differs from {copy}: {res.stdout}{res.stderr}"

    def backup_args(self, *extra: str | Path) -> list[str]:
        """``backup`` of every disk of the lab into its directory, with *extra*."""
        args = ["backup", "--socket", str(self.sock), "--node", *self.disks, "--dir", str(self.dir)]
        return args + [str(e) for e in extra]

    def start_tool(
        self, *args: str | Path, until: str
    ) -> tuple[subprocess.Popen[str], dict[str, Any]]:
        """blockd-backup *args* (which must include --json) as a process of its own, read up
        to its first event of kind *until*; the process and that event."""
        proc = subprocess.Popen(
            [*TOOL, *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            ev: dict[str, Any] = json.loads(line)
            if ev["event"] == until:
                return proc, ev
        proc.wait()
        raise AssertionError(
            f"no {until} event; stderr: {proc.stderr.read() if proc.stderr else ''}"
        )

    def files(self) -> list[str]:
        """What the backup directory holds (lock files aside)."""
        return sorted(
            str(p.relative_to(self.dir)) for p in self.dir.rglob("*") if not p.name.startswith(".")
        )

    def backup(self, *extra: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
        return self.tool(*self.backup_args(*extra), ok=ok)

    def listing(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.tool("list", self.dir, "--json").stdout)
        return out

    def points(self) -> dict[int, dict[str, Any]]:
        return {p["point"]: p for c in self.listing()["chains"] for p in c["points"]}

    def restore_equals(self, point: int, copy: Path, disk: str | None = None) -> Path:
        """Restore *point* (raw) and compare it with *copy*; also check it is thin."""
        out = self.tmp / f"restore-{point}-{disk or 'd'}.raw"
        args: list[str | Path] = [
            "restore",
            self.dir,
            "--point",
            str(point),
            "--to",
            out,
            "--force",
        ]
        if disk:
            args += ["--node", disk]
        self.tool(*args)
        self.assert_same(out, copy)
        st = os.stat(out)
        copy_st = os.stat(copy)
        assert st.st_blocks * 512 <= copy_st.st_blocks * 512 + MiB, "restore is not thin"
        assert st.st_blocks * 512 < st.st_size, "restore is not sparse"
        return out


def flip_byte(layer: Path) -> int:
    """Flip one byte of data that *layer* itself holds; returns its file offset."""
    entries = json.loads(qemu_img("map", "-U", "--output=json", "-f", "qcow2", layer).stdout)
    data = [e for e in entries if e["depth"] == 0 and e["data"] and "offset" in e]
    assert data, f"{layer} holds no data cluster"
    off = int(data[len(data) // 2]["offset"]) + 1234
    with open(layer, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x40]))
    return off
