"""Export deletion racing a second deletion, a bitmap removal and a blockdev-del, from two
connections (issue 9, item 4: ``KeyError`` in the NBD service's finish, "Task exception was
never retrieved").

``block-export-del mode=hard`` with clients connected answers at once and deletes the export
when the connections are gone. A second ``block-export-del`` of it meanwhile was accepted and
started a second deletion that raced the first; qemu-storage-daemon answers "Export 'e' is
already shutting down" (or "not found" once it is gone). The bitmap the export held stays busy
until the export is really gone, and the node stays in use until then.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rawclient import RawQmp
from support import Daemon, check_image, qemu_img

# The NBD tests' raw peer: a client that negotiates and then just holds its connection.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nbd"))
from nbdtest import RawNbd

SHUTTING_DOWN = "Export 'e' is already shutting down"
NOT_FOUND = "Export 'e' is not found"


def _conn(sock: Path) -> RawQmp:
    c = RawQmp(sock, timeout=60)
    c.negotiate()
    return c


def _both(
    a: RawQmp, b: RawQmp, first: tuple[str, dict[str, Any]], second: tuple[str, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    a.send({"execute": first[0], "arguments": first[1]})
    b.send({"execute": second[0], "arguments": second[1]})
    return a.reply(), b.reply()


def _scenario(qmp: list[Path], tmp: Path, rounds: int) -> list[str]:
    """What happened, in words that must be the same on both daemons (*qmp*: three QMP
    sockets, or one socket three times)."""
    a, b, listener = (_conn(p) for p in qmp)
    sock = tmp / f"{qmp[0].stem}-nbd.sock"
    a.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    img = tmp / f"{qmp[0].stem}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    file = {"driver": "file", "filename": str(img)}
    seen = []
    for _ in range(rounds):
        assert "return" in a.cmd(
            "blockdev-add", {"driver": "qcow2", "node-name": "d", "file": file}
        )
        bitmap = {"node": "d", "name": "bm", "persistent": True}
        assert "return" in a.cmd("block-dirty-bitmap-add", bitmap)
        export = {"type": "nbd", "id": "e", "node-name": "d", "writable": True, "bitmaps": ["bm"]}
        assert "return" in a.cmd("block-export-add", export)
        clients = []
        for _ in range(3):
            n = RawNbd(str(sock))
            n.go("d")
            clients.append(n)
        hard = {"id": "e", "mode": "hard"}
        r1, r2 = _both(a, b, ("block-export-del", hard), ("block-export-del", hard))
        ok, refused = (r1, r2) if "return" in r1 else (r2, r1)
        assert "return" in ok, (r1, r2)
        assert refused.get("error", {}).get("desc") in (SHUTTING_DOWN, NOT_FOUND), (r1, r2)
        seen.append("second delete refused")
        # The bitmap and the node are free once the export is gone, not before.
        r1, r2 = _both(
            a,
            b,
            ("block-dirty-bitmap-remove", {"node": "d", "name": "bm"}),
            ("blockdev-del", {"node-name": "d"}),
        )
        for n in clients:
            n.close()
        _wait_no_export(a)
        # Commands of two connections run in either order; each answer is one of these.
        if "error" in r2:
            assert r2["error"]["desc"] == "Node d is in use", r2
        removed = "return" in r1
        if not removed:
            desc = r1["error"]["desc"]
            assert "currently in use" in desc or (desc == "Node 'd' not found" and "return" in r2)
        if "return" not in r2:
            if not removed:
                assert "return" in a.cmd("block-dirty-bitmap-remove", {"node": "d", "name": "bm"})
                removed = True
            assert "return" in a.cmd("blockdev-del", {"node-name": "d"})
        info = json.loads(qemu_img("info", "--output=json", img).stdout)
        stored = [bm["name"] for bm in info["format-specific"]["data"].get("bitmaps", [])]
        assert stored == ([] if removed else ["bm"]), (r1, r2, info)
        if stored:  # deleted with its bitmap, which was stored: remove it for the next round
            qemu_img("bitmap", "--remove", img, "bm")
    # Each export was deleted once: one event each.
    listener.sock.settimeout(0.5)
    events = []
    try:
        while True:
            events.append(listener.recv()["event"])
    except TimeoutError:
        pass
    assert events.count("BLOCK_EXPORT_DELETED") == rounds, events
    assert check_image(img)["rc"] == 0
    return seen


def _wait_no_export(c: RawQmp) -> None:
    deadline = time.monotonic() + 20
    while c.cmd("query-block-exports")["return"]:
        assert time.monotonic() < deadline, "export never went away"
        time.sleep(0.01)


@pytest.mark.qsd
def test_second_export_delete_and_bitmap_remove_while_shutting_down(
    tmp_path: Path, blockd: Daemon, qsd_factory: Callable[..., Daemon]
) -> None:
    # A QSD monitor serves one client: three monitors for three connections.
    more = [tmp_path / f"qsd-{i}.sock" for i in (1, 2)]
    extra = []
    for i, p in enumerate(more):
        extra += ["--chardev", f"socket,path={p},server=on,wait=off,id=m{i}"]
        extra += ["--monitor", f"chardev=m{i}"]
    qsd = qsd_factory(*extra)
    expected = _scenario([qsd.sock, *more], tmp_path, 5)
    assert _scenario([blockd.sock] * 3, tmp_path, 5) == expected
    log = blockd.log_text()
    for bad in ("Traceback", "Task exception was never retrieved", "internal error"):
        assert bad not in log, log[-3000:]
