"""NBD memory and availability under abuse: NBD_CMD_CACHE never reads more than it may hold,
the daemon's memory stays bounded while 100 connections either say nothing or never read
their replies, and a real client (qemu-io) is served meanwhile.

The bound (measured as the daemon's peak RSS, ``VmHWM``): the RSS before the abuse plus
``TOTAL_INFLIGHT_BYTES`` (128 MiB, the bytes all connections may hold together), plus one
largest reply (32 MiB) being copied into a socket's buffer, plus 32 MiB of slack: 192 MiB
over the start. Before this bound existed one CACHE read its whole length into memory (the
256 MiB export: +256 MiB at once) and each non-reading client pinned 64 MiB.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from nbdtest import RawNbd, daemon, uri

from blockd.nbd import protocol as P
from blockd.nbd.transmission import TOTAL_INFLIGHT_BYTES

MiB = 1 << 20
SIZE = 256 * MiB


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key}")


def _export(q: object, tmp: Path, image: Path) -> Path:
    sock = tmp / "nbd.sock"
    q.run(  # type: ignore[attr-defined]
        "blockdev-add",
        {"driver": "raw", "node-name": "big", "file": {"driver": "file", "filename": str(image)}},
    )
    q.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})  # type: ignore[attr-defined]
    q.run("block-export-add", {"type": "nbd", "id": "e", "node-name": "big"})  # type: ignore[attr-defined]
    return sock


def _cache_replies(sock: Path) -> list[tuple[int, bytes]]:
    """CACHE of the whole export in one request, then in 32 MiB pieces, pipelined."""
    c = RawNbd(str(sock), timeout=60)
    c.go("big")
    out = []
    r = c.request(P.CMD_CACHE, 0, SIZE)
    out.append((r["error"], r["chunks"][0][1][6:] if r["chunks"] else b""))
    pieces = range(0, SIZE, P.MAX_BUFFER_SIZE)
    for i, off in enumerate(pieces):
        c.send(P.CMD_CACHE, off, P.MAX_BUFFER_SIZE, handle=100 + i)
    for _ in pieces:
        r = c.reply()
        out.append((r["error"], b""))
    c.disconnect()
    return out


def test_cache_lengths_match_qsd(tmp_path: Path) -> None:
    image = tmp_path / "big.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    got = {}
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        d.mkdir()
        with daemon(d, kind) as (_d, q):
            got[kind] = _cache_replies(_export(q, d, image))
    assert got["blockd"] == got["qsd"]
    assert got["blockd"][0] == (P.NBD_EINVAL, b"len (268435456 ) is larger than max len (33554432)")


def test_memory_bounded_and_real_client_served_under_abuse(tmp_path: Path) -> None:
    image = tmp_path / "big.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    held: list[socket.socket | RawNbd] = []
    with daemon(tmp_path, "blockd") as (d, q):
        sock = _export(q, tmp_path, image)
        pid = d.proc.pid
        base = _status_kib(pid, "VmRSS")
        try:
            assert _cache_replies(sock)[1:] == [(0, b"")] * (SIZE // P.MAX_BUFFER_SIZE)
            # 92 clients that connect and say nothing, 8 that ask for 16 x 32 MiB each and
            # never read a byte of the replies: every one of the 100 slots is taken.
            for _ in range(92):
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(sock))
                held.append(s)
            for _ in range(8):
                c = RawNbd(str(sock))
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                c.go("big", structured=False)
                for h in range(16):
                    c.send(P.CMD_READ, (h * 32 * MiB) % SIZE, 32 * MiB, handle=h)
                held.append(c)
            time.sleep(0.5)
            t0 = time.monotonic()
            res = subprocess.run(
                ["qemu-io", "-r", "-f", "raw", "-c", "read -P 0 100M 1M", uri(sock, "big")],
                capture_output=True,
                text=True,
                timeout=40,
            )
            served_after = time.monotonic() - t0
            assert res.returncode == 0 and "read 1048576/1048576" in res.stdout, res
            peak = _status_kib(pid, "VmHWM")
        finally:
            for h in held:
                h.close()
        q.run("query-block-exports")  # the daemon is still answering
    bound = base + (TOTAL_INFLIGHT_BYTES + P.MAX_BUFFER_SIZE + 32 * MiB) // 1024
    print(
        f"RSS before {base} KiB, peak {peak} KiB, bound {bound} KiB; served in {served_after:.1f}s"
    )
    assert peak <= bound, (peak, bound)
    assert served_after < 20
    log = d.log_text()
    assert "internal error" not in log and "Traceback" not in log
