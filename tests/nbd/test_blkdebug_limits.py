"""blkdebug's size options: QEMU's range and constraint refusals (compared with
qemu-storage-daemon in the same run), and a blkdebug never changes its child's limits: once the
filter is gone, an export of the child advertises the child's own block sizes again."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from nbdtest import RawNbd, daemon

from blockd.nbd import protocol as P

MiB = 1 << 20


def _blkdebug(name: str, img: Path, **sizes: int) -> dict[str, Any]:
    return {
        "driver": "blkdebug",
        "node-name": name,
        "image": {"driver": "file", "filename": str(img)},
        **sizes,
    }


BAD = [
    {"align": 3},
    {"align": 6},
    {"align": 2147483647},
    {"align": 2**31},
    {"align": 2**32},
    {"align": -1},
    {"align": 4096, "max-transfer": 2048},
    {"align": 4096, "max-transfer": 2147483647},
    {"max-transfer": 2**31},
    {"max-transfer": -1},
    {"opt-write-zero": 8192, "max-write-zero": 4096},
    {"align": 512, "opt-discard": 100},
    {"opt-discard": 8192, "max-discard": 4096},
    {"max-discard": 2**32},
    {"max-write-zero": -4096},
]
GOOD = [{"align": 0}, {"max-transfer": 3}, {"align": 1 << 30}, {"align": 1, "max-discard": 1}]


def _block_sizes(sock: Path, export: str) -> tuple[int, int, int]:
    c = RawNbd(str(sock))
    try:
        for rtype, body in c.go(export):
            if rtype == P.REP_INFO and struct.unpack(">H", body[:2])[0] == P.INFO_BLOCK_SIZE:
                _t, lo, pref, hi = P.BLOCK_SIZE_INFO.unpack(body)
                return lo, pref, hi
    finally:
        c.disconnect()
    raise AssertionError("no NBD_INFO_BLOCK_SIZE")


def _scenario(tmp: Path, kind: str) -> list[Any]:
    img = tmp / f"{kind}.img"
    img.write_bytes(bytes(4 * MiB))
    sock = tmp / f"{kind}-nbd.sock"
    out: list[Any] = []
    with daemon(tmp, kind) as (_d, q):
        for i, sizes in enumerate(BAD + GOOD):
            r = q.cmd("blockdev-add", _blkdebug(f"b{i}", img, **sizes))
            out.append((sizes, r.get("error", "ok")))
        nodes = q.run("query-named-block-nodes", {"flat": True})["return"]
        out.append(sorted(n["node-name"] for n in nodes if not n["node-name"].startswith("#")))
        q.run("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
        q.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        before = q.run("query-named-block-nodes", {"flat": True})
        q.run("blockdev-add", {**_blkdebug("dbg", img, align=MiB), "image": "f"})
        q.run("block-export-add", {"type": "nbd", "id": "e", "node-name": "dbg"})
        out.append(("through blkdebug", _block_sizes(sock, "dbg")))
        q.run("block-export-del", {"id": "e"})
        q.run("blockdev-del", {"node-name": "dbg"})
        q.run("block-export-add", {"type": "nbd", "id": "e", "node-name": "f"})
        out.append(("file after blkdebug deleted", _block_sizes(sock, "f")))
        after = q.run("query-named-block-nodes", {"flat": True})
        out.append(("node info unchanged", before == after))
        q.run("block-export-del", {"id": "e"})
    return out


def test_blkdebug_limits_match_qsd(tmp_path: Path) -> None:
    got = {kind: _scenario(tmp_path, kind) for kind in ("blockd", "qsd")}
    assert got["blockd"] == got["qsd"]
    # And what QSD says is what the issue asks for (so the comparison is not vacuous).
    table = dict((repr(s), e) for s, e in got["blockd"][: len(BAD)])
    assert table[repr({"align": 3})] == {
        "class": "GenericError",
        "desc": "Cannot meet constraints with align 3",
    }
    sizes = dict(x for x in got["blockd"] if isinstance(x, tuple) and isinstance(x[0], str))
    assert sizes["through blkdebug"][0] == MiB
    assert sizes["file after blkdebug deleted"][0] == 1
