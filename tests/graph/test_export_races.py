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


def _at_once(conns: list[RawQmp], commands: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Send each command on its own connection back to back, then read every answer."""
    for c, (name, args) in zip(conns, commands, strict=False):
        c.send({"execute": name, "arguments": args})
    return [c.reply() for c in conns[: len(commands)]]


EXPORT_DEL = ("block-export-del", {"id": "e", "mode": "hard"})
BITMAP_REMOVE = ("block-dirty-bitmap-remove", {"node": "d", "name": "bm"})
NODE_DEL = ("blockdev-del", {"node-name": "d"})
#: Per round: the commands sent at once (the export has clients connected).
ROUNDS = [[EXPORT_DEL, EXPORT_DEL], [EXPORT_DEL, BITMAP_REMOVE, NODE_DEL]]


def _scenario(qmp: list[Path], tmp: Path, rounds: int) -> None:
    """*qmp*: four QMP sockets (or one socket four times); the last only listens."""
    *conns, listener = (_conn(p) for p in qmp)
    a = conns[0]
    sock = tmp / f"{qmp[0].stem}-nbd.sock"
    a.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    img = tmp / f"{qmp[0].stem}.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    file = {"driver": "file", "filename": str(img)}
    for i in range(rounds):
        node = {"driver": "qcow2", "node-name": "d", "file": file}
        assert "return" in a.cmd("blockdev-add", node)
        bitmap = {"node": "d", "name": "bm", "persistent": True}
        assert "return" in a.cmd("block-dirty-bitmap-add", bitmap)
        export = {"type": "nbd", "id": "e", "node-name": "d", "writable": True, "bitmaps": ["bm"]}
        assert "return" in a.cmd("block-export-add", export)
        clients = []
        for _ in range(3):
            n = RawNbd(str(sock))
            n.go("d")
            clients.append(n)
        commands = ROUNDS[i % len(ROUNDS)]
        replies = _at_once(conns, commands)
        if commands == ROUNDS[0]:
            # Two deletions: one is accepted, the other finds the export shutting down (or
            # already gone).
            ok = [r for r in replies if "return" in r]
            refused = [r["error"]["desc"] for r in replies if "error" in r]
            assert len(ok) == 1 and refused[0] in (SHUTTING_DOWN, NOT_FOUND), replies
            replies = _at_once(conns, [BITMAP_REMOVE, NODE_DEL])
        else:
            # In whichever order they ran, the export deletion is accepted; the bitmap and
            # the node are free once the export is gone, not before.
            assert "return" in replies.pop(0), replies
        r_remove, r_del = replies
        for n in clients:
            n.close()
        _wait_no_export(a)
        if "error" in r_del:
            assert r_del["error"]["desc"] == "Node d is in use", replies
        removed = "return" in r_remove
        if not removed:
            desc = r_remove["error"]["desc"]
            gone_first = desc == "Node 'd' not found" and "return" in r_del
            assert "currently in use" in desc or gone_first, replies
        if "return" not in r_del:
            if not removed:
                assert "return" in a.cmd(*BITMAP_REMOVE)
                removed = True
            assert "return" in a.cmd(*NODE_DEL)
        info = json.loads(qemu_img("info", "--output=json", img).stdout)
        stored = [bm["name"] for bm in info["format-specific"]["data"].get("bitmaps", [])]
        assert stored == ([] if removed else ["bm"]), (replies, info)
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


def _wait_no_export(c: RawQmp) -> None:
    deadline = time.monotonic() + 20
    while c.cmd("query-block-exports")["return"]:
        assert time.monotonic() < deadline, "export never went away"
        time.sleep(0.01)


@pytest.mark.qsd
def test_second_export_delete_and_bitmap_remove_while_shutting_down(
    tmp_path: Path, blockd: Daemon, qsd_factory: Callable[..., Daemon]
) -> None:
    # A QSD monitor serves one client: four monitors for four connections.
    more = [tmp_path / f"qsd-{i}.sock" for i in (1, 2, 3)]
    extra = []
    for i, p in enumerate(more):
        extra += ["--chardev", f"socket,path={p},server=on,wait=off,id=m{i}"]
        extra += ["--monitor", f"chardev=m{i}"]
    qsd = qsd_factory(*extra)
    _scenario([qsd.sock, *more], tmp_path, 6)
    _scenario([blockd.sock] * 4, tmp_path, 6)
    log = blockd.log_text()
    for bad in ("Traceback", "Task exception was never retrieved", "internal error"):
        assert bad not in log, log[-3000:]
