"""The setting of QEMU's docs/interop/live-block-operations.rst, for tests that type its
examples into qmp-shell: a daemon started in the test's directory (the document names images
relative to where QEMU runs), node-A on ``a.qcow2``, an NBD export standing in for the guest
that writes to the active layer, and the chain ``[A] <- [B] <- [C] <- [D]`` built with the
document's own ``blockdev-snapshot-sync`` lines."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffsupport import MiB
from shellclient import ShellClient
from support import Daemon, qemu_img, qemu_io, start_blockd, start_qsd

SIZE = 16 * MiB
#: What the "guest" writes before each snapshot (pattern, offset, length): every layer gets
#: data of its own, some of it over the layers below.
GUEST_WRITES = {
    "A": [(0xA1, 0, 4 * MiB), (0xA2, 12 * MiB, MiB)],
    "B": [(0xB1, 2 * MiB, MiB), (0xB2, 7 * MiB + 4096, 100000)],
    "C": [(0xC1, 3 * MiB, 2 * MiB)],
    "D": [(0xD1, MiB, 64 * 1024), (0xD2, 15 * MiB, MiB)],
}


class Guest:
    """The guest: qemu-io writing over the export of the active layer, and reading it all."""

    def __init__(self, d: Path) -> None:
        self.url = f"nbd+unix:///disk?socket={d / 'nbd.sock'}"

    def write(self, writes: list[tuple[int, int, int]]) -> None:
        cmds: list[str] = []
        for pattern, off, n in writes:
            cmds += ["-c", f"write -P {pattern} {off} {n}"]
        qemu_io("-f", "raw", *cmds, self.url)

    def snapshot(self, dest: Path) -> Path:
        """What the guest sees now, as a raw image."""
        qemu_img("convert", "-f", "raw", "-O", "raw", self.url, dest)
        return dest


@contextmanager
def daemon_in(
    d: Path, node: str, filename: str, kind: str = "blockd"
) -> Iterator[tuple[Daemon, ShellClient]]:
    """blockd (or qemu-storage-daemon) running in *d* with qcow2 *node* on *filename*, as the
    document's ``-blockdev`` line opens it, and qmp-shell on its socket."""
    opts = {
        "node-name": node,
        "driver": "qcow2",
        "file": {"driver": "file", "node-name": "file", "filename": filename},
    }
    start = start_blockd if kind == "blockd" else start_qsd
    daemon = start(d, "--blockdev", json.dumps(opts), name=kind, cwd=d)
    shell = ShellClient(daemon.sock, d)
    try:
        yield daemon, shell
    finally:
        shell.close()
        daemon.stop()


@contextmanager
def lbo_daemon(d: Path, kind: str = "blockd") -> Iterator[tuple[Daemon, ShellClient, Guest]]:
    """A daemon running in *d* with node-A and the guest's export, and qmp-shell on it."""
    qemu_img("create", "-f", "qcow2", d / "a.qcow2", str(SIZE))
    with daemon_in(d, "node-A", "./a.qcow2", kind) as (daemon, shell):
        run(shell, f'nbd-server-start addr={{"type":"unix","data":{{"path":"{d / "nbd.sock"}"}}}}')
        run(shell, "block-export-add type=nbd id=disk node-name=node-A name=disk writable=true")
        guest = Guest(d)
        guest.write(GUEST_WRITES["A"])
        yield daemon, shell, guest


def run(shell: ShellClient, line: str) -> Any:
    """Type *line*; its reply's ``return`` (an error fails the test)."""
    out = shell.type(line)
    reply = json.loads(out)
    assert "return" in reply, f"{line}: {reply}"
    return reply["return"]


def build_chain(shell: ShellClient, guest: Guest) -> None:
    """The document's three snapshot lines, the guest writing to each new active layer."""
    for prev, new in (("A", "B"), ("B", "C"), ("C", "D")):
        run(
            shell,
            f"blockdev-snapshot-sync node-name=node-{prev} snapshot-file={new.lower()}.qcow2 "
            f"snapshot-node-name=node-{new} format=qcow2",
        )
        guest.write(GUEST_WRITES[new])


def job_events(shell: ShellClient, job: str, until: str) -> list[dict[str, Any]]:
    """The BLOCK_JOB_* events of *job* up to and including *until*, as qmp-shell printed
    them."""

    def done(e: dict[str, Any]) -> bool:
        return e["event"] == until and e["data"].get("device") == job

    asyncio.run(shell.wait_event(done, timeout=60))
    return [
        e
        for e in shell.events
        if e["event"].startswith("BLOCK_JOB_") and e["data"].get("device") == job
    ]


def chain_files(path: Path) -> list[tuple[str, str | None]]:
    """``qemu-img info --backing-chain``: (image, backing file it names) per layer."""
    out = json.loads(qemu_img("info", "-U", "--backing-chain", "--output=json", path).stdout)
    return [(Path(i["filename"]).name, i.get("backing-filename")) for i in out]


def identical(a: Path, b: Path, fmt_a: str = "qcow2", fmt_b: str = "raw") -> bool:
    res = qemu_img("compare", "-U", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    return res.returncode == 0 and "Images are identical" in res.stdout
