"""Helpers of the vmdk tests: a pair of daemons (blockd and qemu-storage-daemon) that open,
export and close the same image side by side, and builders of vmdk images with qemu-img and
qemu-io.

The seSparse and VMDK3 generators live in imagegen.py: no tool here makes those formats.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from nbdtest import Qmp, map_of
from support import Daemon, qemu_img, qemu_io, run, start_blockd, start_qsd

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
SIDES = ("blockd", "qsd")
CID = re.compile(rb"(?m)^CID=[0-9a-f]+$")


class Pair:
    """blockd and QSD, each with an NBD server on a Unix socket in *tmp*."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.daemons: dict[str, Daemon] = {}
        self.qmp: dict[str, Qmp] = {}
        self.nbd: dict[str, Path] = {}
        try:
            for side in SIDES:
                self.start(side)
        except BaseException:
            self.close()
            raise

    def start(self, side: str, generation: int = 0) -> None:
        start = start_blockd if side == "blockd" else start_qsd
        d = start(self.tmp, name=f"{side}{generation or ''}")
        self.daemons[side] = d
        self.qmp[side] = _connect(d)
        sock = self.tmp / f"{side}{generation or ''}-nbd.sock"
        self.qmp[side].run(
            "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}
        )
        self.nbd[side] = sock

    def restart_qsd(self) -> None:
        """Replace a crashed qemu-storage-daemon (the oracle has bugs blockd must not copy)."""
        self.qmp["qsd"].close()
        self.daemons["qsd"].stop()
        self.generation = getattr(self, "generation", 0) + 1
        self.start("qsd", self.generation)

    def close(self) -> None:
        for q in self.qmp.values():
            q.close()
        rc = {side: d.stop() for side, d in self.daemons.items()}
        blockd = self.daemons.get("blockd")
        assert blockd is None or rc["blockd"] == 0, blockd.log_text()[-3000:]
        if blockd is not None:
            log = blockd.log_text()
            assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:4000]

    def cmd(self, side: str, execute: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.qmp[side].cmd(execute, args)

    def both(self, execute: str, args: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Run one command on both daemons; each reply with its timestamp-free error."""
        out = {}
        for side in SIDES:
            r = self.cmd(side, execute, args)
            if "error" in r:
                r = {"error": {"class": r["error"]["class"], "desc": r["error"]["desc"]}}
            out[side] = r
        return out

    def add(self, spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return self.both("blockdev-add", spec)

    def add_ok(self, spec: dict[str, Any]) -> None:
        got = self.add(spec)
        assert all("return" in r for r in got.values()), got

    def export(self, node: str, **extra: Any) -> dict[str, str]:
        """Export *node* on both daemons (with qemu:allocation-depth); the NBD URIs."""
        uris = {}
        for side in SIDES:
            args = {"type": "nbd", "id": node, "node-name": node, "allocation-depth": True}
            self.qmp[side].run("block-export-add", {**args, **extra})
            uris[side] = f"nbd+unix:///{node}?socket={self.nbd[side]}"
        return uris

    def drop(self, node: str, exported: bool = True) -> None:
        """Remove the export (waiting until it is gone) and the node on both daemons."""
        for side in SIDES:
            if exported:
                self.unexport(side, node)
            self.qmp[side].run("blockdev-del", {"node-name": node})

    def unexport(self, side: str, export: str) -> None:
        """block-export-del, then wait for this export's BLOCK_EXPORT_DELETED."""
        q = self.qmp[side]
        q.run("block-export-del", {"id": export})
        deadline = time.monotonic() + 60
        while True:
            for e in q.events:
                if e["event"] == "BLOCK_EXPORT_DELETED" and e["data"]["id"] == export:
                    q.events.remove(e)
                    return
            assert time.monotonic() < deadline, f"{side}: export {export} never went away"
            msg = q.recv()
            if "event" in msg:
                q.events.append(msg)

    def named_node(self, side: str, node: str, flat: bool = True) -> dict[str, Any]:
        nodes = self.qmp[side].run("query-named-block-nodes", {"flat": flat})["return"]
        return next(n for n in nodes if n["node-name"] == node)


def _connect(d: Daemon) -> Qmp:
    """A QMP session; QSD's monitor may still be closing the probe connection of
    wait_for_socket and drop the next one, so try again once."""
    try:
        return Qmp(d.sock, timeout=60)
    except EOFError:
        time.sleep(0.2)
        return Qmp(d.sock, timeout=60)


def per_side(tmp: Path, *files: Path) -> dict[str, Path]:
    """A copy of *files* for each daemon (an image opened read/write by one daemon is
    locked against the other), in tmp/blockd and tmp/qsd; the copies keep their names."""
    out = {}
    for side in SIDES:
        d = tmp / side
        d.mkdir(exist_ok=True)
        for f in files:
            shutil.copyfile(f, d / f.name)
        out[side] = d
    return out


def vmdk_node(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "driver": "vmdk",
        "node-name": name,
        "file": {"driver": "file", "filename": str(path)},
        **extra,
    }


def nbd_map(target: str, context: str | None = None) -> str:
    args = ["nbdinfo", f"--map={context}" if context else "--map", target]
    return run(*args).stdout


def views(uris: dict[str, str]) -> dict[str, Any]:
    """What each daemon's export shows: qemu-img map, nbdinfo --map of base:allocation and
    of qemu:allocation-depth."""
    out: dict[str, Any] = {}
    for side, u in uris.items():
        out[side] = {
            "map": map_of(u),
            "nbdinfo": nbd_map(u),
            "depth": nbd_map(u, "qemu:allocation-depth"),
        }
    return out


def same_data(uri: str, image: str | Path, fmt: str = "raw") -> None:
    """``qemu-img compare`` of an NBD export (raw) with *image* as qemu-img itself reads it.

    A vmdk is first converted to a sparse raw file: comparing with the vmdk directly makes
    qemu-img ask the export's block status grain by grain (minutes for a 2 GiB image)."""
    ref = Path(image)
    if fmt != "raw":
        ref = Path(str(image) + ".qemu.raw")
        qemu_img("convert", "-U", "-f", fmt, "-O", "raw", str(image), str(ref))
    try:
        res = qemu_img("compare", "-U", "-f", "raw", "-F", "raw", uri, str(ref), check=False)
        assert res.returncode == 0, f"{uri} vs {image}: {res.stdout}{res.stderr}"
    finally:
        if fmt != "raw":
            ref.unlink()


def _no_data(path: Path, start: int) -> bool:
    with open(path, "rb") as f:
        try:
            os.lseek(f.fileno(), start, os.SEEK_DATA)
        except OSError:
            return True
    return False


def same_files(a: Path, b: Path) -> None:
    """The same file, apart from the random CID in the descriptor (whose length varies)."""
    if a.stat().st_size > 64 * MiB:
        # A flat extent: zeroes of the right size (QEMU allocates the first block of a new
        # file, blockd leaves all of it a hole).
        assert a.stat().st_size == b.stat().st_size, a
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read(MiB) == fb.read(MiB) == bytes(MiB)
        assert _no_data(a, MiB) and _no_data(b, MiB), a
        return
    da, db = a.read_bytes(), b.read_bytes()
    if da[:4] == b"KDMV":
        # The descriptor sits in sectors 1-20; everything else must be the same bytes.
        assert da[:512] == db[:512] and da[10752:] == db[10752:], f"{a} differs from {b}"
        da, db = da[512:10752], db[512:10752]
    ta, tb = (CID.sub(b"CID=?", d.split(b"\0", 1)[0]) for d in (da, db))
    assert ta == tb, f"{a} differs from {b}"


def random_source(path: Path, rng: random.Random, size: int = 2 * MiB) -> Path:
    path.write_bytes(rng.randbytes(size))
    return path


def fill(
    image: Path,
    size: int,
    rng: random.Random,
    src: Path,
    ops: int = 14,
    zero: bool = True,
    fmt: str = "vmdk",
) -> None:
    """Random data from *src*, at random (mostly unaligned) places, and some zero writes,
    in one qemu-io run."""
    cmds: list[str] = []
    for _ in range(ops):
        n = rng.choice([1, 511, 4096, 65536, 70000, 300 * KiB, 1 * MiB + 7])
        off = rng.randrange(0, size - n)
        if zero and rng.random() < 0.25:
            off -= off % 512
            n = max(512, n - n % 512)
            cmds += ["-c", f"write -z {off} {n}"]
        else:
            cmds += ["-c", f"write -s {src} {off} {n}"]
    qemu_io("-f", fmt, *cmds, image)


def cid_of(desc_text: bytes, name: str = "CID") -> int:
    m = re.search(rb"(?m)^" + name.encode() + rb"=([0-9a-fA-F]+)", desc_text)
    assert m, desc_text[:400]
    return int(m.group(1), 16)


def descriptor_of(path: Path) -> bytes:
    """A vmdk's descriptor text: the file itself, or the one embedded at sector 1."""
    data = path.read_bytes()
    if data[:4] == b"KDMV":
        data = data[512 : 512 + 10240]
    return data.split(b"\0", 1)[0]


def info(path: Path) -> dict[str, Any]:
    return dict(json.loads(qemu_img("info", "--output=json", "-U", str(path)).stdout))


def qemu_map_fails(uri: str) -> str:
    res = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "raw", uri], capture_output=True, text=True
    )
    assert res.returncode != 0, f"qemu-img map of {uri} succeeded"
    return res.stderr
