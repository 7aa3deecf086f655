"""Persistent bitmaps that cannot be stored because the disk is full: ``blockdev-del`` keeps
the node, says so, and its retry once space is free stores them (those already in the image
and those never stored alike); at shutdown the log says which ones were lost and which ones
stay flagged in use, and gives no advice that cannot be followed any more."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffsupport import MiB, Session, nbd_write, qcow2_image, qcow2_node
from smallfs import fill, small_tmpfs
from support import check_image, qemu_img, start_blockd, start_qsd


def _bitmaps(path: Path) -> dict[str, list[str]]:
    info = json.loads(qemu_img("info", "-U", "--output=json", path).stdout)
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"].get("bitmaps", [])}


def _counts(s: Session, node: str) -> dict[str, int]:
    return {b["name"]: b["count"] for b in s.bitmaps(node) if b.get("persistent")}


def _with_two_bitmaps(tmp: Path, img: Path) -> tuple[Any, Session]:
    """blockd with node d on *img*: bitmap 'old' already in the image (stored by an earlier
    close), 'new' added now, both with 1 MiB dirty."""
    d = start_blockd(tmp)
    s = Session(d.sock)
    s.ok("blockdev-add", qcow2_node("d", img))
    s.ok("block-dirty-bitmap-add", {"node": "d", "name": "old", "persistent": True})
    s.ok("blockdev-del", {"node-name": "d"})
    s.ok("blockdev-add", qcow2_node("d", img))
    s.ok("block-dirty-bitmap-add", {"node": "d", "name": "new", "persistent": True})
    sock = tmp / "nbd.sock"
    s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    s.ok("block-export-add", {"type": "nbd", "id": "e", "node-name": "d", "writable": True})
    nbd_write(sock, "d", 0x5A, 4 * MiB, MiB)
    s.ok("block-export-del", {"id": "e"})
    s.wait(lambda e: e.get("event") == "BLOCK_EXPORT_DELETED")
    s.ok("nbd-server-stop")
    assert _counts(s, "d") == {"old": MiB, "new": MiB}
    return d, s


def test_blockdev_del_retry_after_enospc_stores_the_bitmaps(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "fs", "4m") as fs:
        img = qcow2_image(fs / "a.qcow2", 64 * MiB, [(0x11, 0, MiB)])
        d, s = _with_two_bitmaps(tmp_path, img)
        filler = fill(fs)
        err = s.err("blockdev-del", {"node-name": "d"})
        assert err == (
            "Failed to store bitmaps: No space left on device; node 'd' is kept with its "
            "bitmaps: run blockdev-del again once the cause is fixed to store them, or remove "
            "'old', 'new' with block-dirty-bitmap-remove to delete the node without them"
        )
        assert _counts(s, "d") == {"old": MiB, "new": MiB}
        filler.unlink()
        s.ok("blockdev-del", {"node-name": "d"})
        assert s.ok("query-named-block-nodes") == []
        s.close()
        assert d.stop() == 0
        assert _bitmaps(img) == {"old": ["auto"], "new": ["auto"]}
        res = check_image(img)
        assert res["rc"] == 0, res
        # QEMU reads back what was stored: the 1 MiB written while both recorded.
        q = start_qsd(tmp_path, "--blockdev", f"driver=file,node-name=f,filename={img}")
        try:
            qs = Session(q.sock)
            qs.ok("blockdev-add", {"driver": "qcow2", "node-name": "d", "file": "f"})
            assert _counts(qs, "d") == {"old": MiB, "new": MiB}
            qs.close()
        finally:
            q.stop()


def test_quit_on_a_full_disk_logs_what_became_of_each_bitmap(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "fs", "4m") as fs:
        img = qcow2_image(fs / "a.qcow2", 64 * MiB, [(0x11, 0, MiB)])
        d, s = _with_two_bitmaps(tmp_path, img)
        fill(fs)
        assert s.ok("quit") == {}
        s.close()
        assert d.proc.wait(timeout=30) == 0
        log = d.log_text()
        assert (
            "d: persistent bitmaps not stored: Failed to store bitmaps: No space left on "
            "device; 'old' stay flagged in use in the image (reported inconsistent); 'new' "
            "were never in the image and are lost"
        ) in log, log[-3000:]
        assert "blockdev-del again" not in log
        assert _bitmaps(img) == {"old": ["in-use", "auto"]}
