"""A client that connects the moment blockd's socket appears is served only once the
``--blockdev`` nodes of the command line are open, as with qemu-storage-daemon (which runs no
monitor command before it has processed its whole command line). The guide restarts blockd with
``--blockdev`` and uses the node at once."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from rawclient import RawQmp
from support import ROOT, qemu_img

NODES = 40


def _connect_at_once(sock: Path, proc: subprocess.Popen[bytes]) -> RawQmp:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None and time.monotonic() < deadline
        try:
            return RawQmp(sock, timeout=30)
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.001)


def test_commands_wait_for_the_command_line_nodes(tmp_path: Path) -> None:
    specs = []
    for i in range(NODES):
        img = tmp_path / f"d{i}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", img, "1M")
        specs += ["--blockdev", f"driver=qcow2,node-name=n{i},file.driver=file,file.filename={img}"]
    sock = tmp_path / "b.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockd", "--socket", str(sock), *specs],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = _connect_at_once(sock, proc)
        try:
            client.negotiate()
            nodes = client.cmd("query-named-block-nodes")["return"]
        finally:
            client.close()
        names = {n["node-name"] for n in nodes}
        assert {f"n{i}" for i in range(NODES)} <= names, sorted(names)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
