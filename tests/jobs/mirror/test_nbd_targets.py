"""drive-mirror and drive-backup targets named as NBD exports, in QEMU's URI and legacy forms
(``nbd:unix:PATH[:exportname=NAME]``, ``nbd:HOST:PORT[:exportname=NAME]``,
``nbd+unix:///NAME?socket=PATH``, ``nbd://HOST:PORT/NAME``), side by side with
qemu-storage-daemon: both open an ``nbd`` node (the format probed as raw), copy into the export
qemu-nbd serves, and free the node after the job."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from diffsupport import MiB, Session, compare, qcow2_image, qcow2_node, raw_image
from jobdiff import both, events, graph

pytestmark = [pytest.mark.qsd]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(img: Path, name: str, where: str | int) -> subprocess.Popen[bytes]:
    """qemu-nbd serving *img* as export *name* on a Unix socket path or a TCP port."""
    addr = ["-k", str(where)] if isinstance(where, str) else ["-b", "127.0.0.1", "-p", str(where)]
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-x", name, "-t", *addr, str(img)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if isinstance(where, str):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(where)
            else:
                socket.create_connection(("127.0.0.1", where), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise AssertionError("qemu-nbd did not start")


FORMS = [
    "nbd:unix:{sock}:exportname=disk",
    pytest.param("nbd:127.0.0.1:{port}:exportname=disk", marks=pytest.mark.slow),
    pytest.param("nbd+unix:///disk?socket={sock}", marks=pytest.mark.slow),
    "nbd://127.0.0.1:{port}/disk",
]


@pytest.mark.parametrize("form", FORMS)
def test_nbd_target_forms(tmp_path: Path, form: str) -> None:
    def build(d: Path) -> None:
        qcow2_image(d / "src.qcow2", 8 * MiB, [(0x41, 0, MiB), (0x42, 5 * MiB, 300000)])
        raw_image(d / "m.raw", 8 * MiB)
        raw_image(d / "b.raw", 8 * MiB)

    port = _port()  # the same for both daemons: it shows in error texts

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        target = form.format(sock=d / "nbd.sock", port=port)
        where: str | int = str(d / "nbd.sock") if "sock" in form else port
        s.ok("blockdev-add", qcow2_node("src", d / "src.qcow2"))
        out: dict[str, Any] = {}
        for cmd, img in (("drive-mirror", "m.raw"), ("drive-backup", "b.raw")):
            server = _serve(d / img, "disk", where)
            job = cmd.removeprefix("drive-")
            try:
                s.ok(
                    cmd,
                    {
                        "job-id": job,
                        "device": "src",
                        "target": target,
                        "sync": "full",
                        "mode": "existing",
                    },
                )
                if cmd == "drive-mirror":
                    s.wait_job(job, "ready")
                    out["during"] = [r for r in graph(s) if r[1] in ("nbd", "mirror_top")]
                    s.ok("block-job-cancel", {"device": job})
                s.wait_job(job, "null")
            finally:
                server.terminate()
                server.wait()
        out["creating"] = s.cmd(
            "drive-mirror", {"job-id": "k", "device": "src", "target": target, "sync": "full"}
        ).get("error")
        return {**out, "events": events(s), "after": graph(s)}

    both(tmp_path, build, scenario)
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        for img in ("m.raw", "b.raw"):
            assert compare(d / "src.qcow2", d / img, "qcow2", "raw")
