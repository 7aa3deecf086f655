"""``serve``: a point exported read-only over NBD by the daemon itself (instant restore), on the
daemon's running NBD server or on one the tool starts, and everything removed again when the
tool is interrupted. Then ``restore`` refuses to overwrite a file and writes qcow2 on request.
"""

from __future__ import annotations

import re
import signal
import subprocess

from bblab import Lab, MiB
from support import qemu_img, qemu_io


def _serve(lab: Lab, point: int, nbd: str) -> tuple[subprocess.Popen[str], str]:
    args = ["serve", lab.dir, "--point", str(point), "--socket", lab.sock, "--nbd", nbd, "--json"]
    proc, ev = lab.start_tool(*args, until="result")
    return proc, str(ev["uri"])


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err + out
    return out


def _ours(lab: Lab) -> list[str]:
    nodes = [n["node-name"] for n in lab.qmp("query-named-block-nodes", {"flat": True})]
    exports = [e["id"] for e in lab.qmp("query-block-exports")]
    return [n for n in nodes + exports if re.match(r"bb[0-9a-f]{6}-", n)]


def test_serve_a_point(lab: Lab) -> None:
    lab.add_disk("disk0", 16 * MiB)
    lab.night(1, write=False)
    lab.night(2)

    # on the NBD server the daemon runs already
    proc, uri = _serve(lab, 1, str(lab.nbd))
    assert uri == f"nbd+unix:///disk0-p1?socket={lab.nbd}"
    try:
        lab.assert_same(uri, lab.copies[1]["disk0"])
        denied = qemu_io("-f", "raw", "-c", "write -P 9 0 4k", uri, check=False)
        assert "Could not open image: Permission denied" in denied.stderr, denied.stderr
        lab.assert_same(uri, lab.copies[1]["disk0"])  # read-only for real: unchanged
    finally:
        _stop(proc)
    assert _ours(lab) == []

    # no server running: the tool starts one on its own socket and stops it afterwards
    lab.qmp("nbd-server-stop")
    own = str(lab.tmp / "serve.sock")
    proc, uri = _serve(lab, 2, own)
    try:
        lab.assert_same(uri, lab.copies[2]["disk0"])
    finally:
        _stop(proc)
    assert _ours(lab) == []
    lab.qmp("nbd-server-start", {"addr": {"type": "unix", "data": {"path": own}}})
    # the server was the tool's to stop: it is gone, so a new one can start on the same socket

    # restore refuses to overwrite a file, and writes a standalone qcow2 on request
    out = lab.tmp / "out.qcow2"
    out.write_bytes(b"precious")
    refused = lab.tool(
        "restore", lab.dir, "--point", "1", "--to", out, "--format", "qcow2", ok=False
    )
    assert refused.returncode == 1 and "exists; add --force" in refused.stderr
    assert out.read_bytes() == b"precious"
    lab.tool("restore", lab.dir, "--point", "1", "--to", out, "--format", "qcow2", "--force")
    res = qemu_img("compare", "-f", "qcow2", "-F", "raw", out, lab.copies[1]["disk0"], check=False)
    assert res.returncode == 0, res.stdout
    missing = lab.tool("restore", lab.dir, "--point", "9", "--to", lab.tmp / "x", ok=False)
    assert "has no point 9 (points: 1, 2)" in missing.stderr
