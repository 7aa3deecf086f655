"""Commands from different clients that race each other (QMP serialises commands per
session only): each graph-changing command must be atomic with respect to the others.

Every case pipelines two commands on two connections so that the second arrives while the
first is still inside its awaits; before commands were serialised across sessions each of
these interleaved and lost data or nodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffsupport import qcow2_image
from rawclient import RawQmp
from support import Daemon, check_image, qemu_img, qemu_io


def _conn(d: Daemon) -> RawQmp:
    c = RawQmp(d.sock, timeout=60)
    c.negotiate()
    return c


def _both(
    a: RawQmp,
    b: RawQmp,
    first: tuple[str, dict[str, Any]],
    second: tuple[str, dict[str, Any]],
    events: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send *first* on *a* and *second* on *b* back to back, then read both replies
    (events *a* receives meanwhile go to *events*)."""
    a.send({"execute": first[0], "arguments": first[1]})
    b.send({"execute": second[0], "arguments": second[1]})
    while True:
        m = a.recv()
        if "event" not in m:
            break
        if events is not None:
            events.append(m)
    return m, b.reply()


def _qcow2(name: str, path: Path) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name, "file": {"driver": "file", "filename": str(path)}}


def test_same_node_name_from_two_clients(tmp_path: Path, blockd: Daemon) -> None:
    a, b = _conn(blockd), _conn(blockd)
    for i in range(8):
        img1, img2 = tmp_path / f"x{i}.qcow2", tmp_path / f"y{i}.qcow2"
        qcow2_image(img1, 1 << 20)
        qcow2_image(img2, 1 << 20)
        r1, r2 = _both(
            a, b, ("blockdev-add", _qcow2("n", img1)), ("blockdev-add", _qcow2("n", img2))
        )
        oks = ["return" in r for r in (r1, r2)]
        assert oks.count(True) == 1, (r1, r2)
        err = r2 if oks[0] else r1
        assert err["error"]["desc"] == "Duplicate nodes with node-name='n'"
        r1, r2 = _both(
            a, b, ("blockdev-del", {"node-name": "n"}), ("blockdev-del", {"node-name": "n"})
        )
        assert "return" in r1, r1
        assert r2["error"]["desc"] == "Failed to find node with node-name='n'"
        nodes = a.cmd("query-named-block-nodes")["return"]
        assert nodes == [], nodes
    for i in range(8):
        assert check_image(tmp_path / f"x{i}.qcow2")["rc"] == 0
    # Nothing stays open: no leaked node holds a lock on any image.
    qemu_img("info", tmp_path / "x0.qcow2")
    qemu_img("info", tmp_path / "y0.qcow2")


def test_delete_and_export_race_never_leaves_a_clean_bitmap(tmp_path: Path, blockd: Daemon) -> None:
    """blockdev-del stores the bitmaps (clearing in-use) and awaits I/O; an export attached
    in that window wrote behind the stored bitmap's back. Now exactly one command wins."""
    a, b = _conn(blockd), _conn(blockd)
    a.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp_path / "n")}}})
    outcomes = set()
    for i in range(6):
        img = tmp_path / f"d{i}.qcow2"
        qcow2_image(img, 8 << 20)
        assert "return" in a.cmd("blockdev-add", _qcow2("d", img))
        add = {"node": "d", "name": "bm", "persistent": True}
        assert "return" in a.cmd("block-dirty-bitmap-add", add)
        exp = {"type": "nbd", "id": "e", "node-name": "d", "writable": True}
        r_del, r_exp = _both(a, b, ("blockdev-del", {"node-name": "d"}), ("block-export-add", exp))
        assert ("return" in r_del) != ("return" in r_exp), (r_del, r_exp)
        if "return" in r_exp:
            outcomes.add("export")
            assert r_del["error"]["desc"] == "Node d is in use"
            qemu_io("-f", "raw", "-c", "write -P 7 0 1M", f"nbd+unix:///d?socket={tmp_path / 'n'}")
            assert "return" in a.cmd("block-export-del", {"id": "e"})
            _wait_export_gone(a)
            assert "return" in a.cmd("blockdev-del", {"node-name": "d"})
            info = json.loads(qemu_img("info", "--output=json", img).stdout)
            bms = info["format-specific"]["data"]["bitmaps"]
            assert [bm["name"] for bm in bms] == ["bm"]
            assert "in-use" not in bms[0]["flags"]
        else:
            outcomes.add("delete")
            assert r_exp["error"]["class"] == "GenericError", r_exp
        assert check_image(img)["rc"] == 0
    assert outcomes


def _wait_export_gone(c: RawQmp) -> None:
    for _ in range(200):
        if c.cmd("query-block-exports")["return"] == []:
            return
    raise AssertionError("export not gone")


def test_finalize_and_cancel_race_keeps_the_bitmap(tmp_path: Path, blockd: Daemon) -> None:
    """job-finalize and job-cancel (or a second job-finalize) of a pending sync=bitmap
    backup: one of them wins; a cancelled job never clears its bitmap, events come once."""
    a, b = _conn(blockd), _conn(blockd)
    src = tmp_path / "s.qcow2"
    qcow2_image(src, 8 << 20)
    a.cmd("blockdev-add", _qcow2("s", src))
    a.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp_path / "n")}}})
    seen = set()
    pairs = [("job-finalize", "job-cancel"), ("job-cancel", "job-finalize")]
    pairs.append(("job-finalize", "job-finalize"))
    for i in range(6):
        assert "return" in a.cmd("block-dirty-bitmap-add", {"node": "s", "name": "bm"})
        a.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "s", "writable": True})
        qemu_io("-f", "raw", "-c", "write -P 1 0 4M", f"nbd+unix:///s?socket={tmp_path / 'n'}")
        a.cmd("block-export-del", {"id": "e"})
        _wait_export_gone(a)
        # drive-backup: the job owns its target and closes it while finalizing, so the
        # finalization really waits for I/O half-way.
        args = {
            "job-id": "j",
            "device": "s",
            "target": str(tmp_path / f"t{i}.qcow2"),
            "format": "qcow2",
            "sync": "bitmap",
            "bitmap": "bm",
            "bitmap-mode": "on-success",
            "auto-finalize": False,
        }
        assert "return" in a.cmd("drive-backup", args)
        events = _wait_status(a, "j", "pending")
        verbs = [(verb, {"id": "j"}) for verb in pairs[i % 3]]
        r1, r2 = _both(a, b, verbs[0], verbs[1], events)
        assert "return" in r1, r1
        assert "error" in r2, r2
        if not any(e["data"] == {"id": "j", "status": "concluded"} for e in events):
            events += _wait_status(a, "j", "concluded")
        names = [e["event"] for e in events if e["event"].startswith("BLOCK_JOB_")]
        count = _bitmap_count(a, "s", "bm")
        if verbs[0][0] == "job-finalize":
            assert names == ["BLOCK_JOB_PENDING", "BLOCK_JOB_COMPLETED"], names
            assert count == 0
            seen.add("finalized")
        else:
            assert names == ["BLOCK_JOB_PENDING", "BLOCK_JOB_CANCELLED"], names
            assert count == 4 << 20
            seen.add("cancelled")
        assert "return" in a.cmd("block-dirty-bitmap-remove", {"node": "s", "name": "bm"})
    assert seen == {"finalized", "cancelled"}


def _wait_status(c: RawQmp, job: str, status: str) -> list[dict[str, Any]]:
    events = []
    while True:
        m = c.recv()
        if "event" not in m:
            continue
        events.append(m)
        if m["event"] == "JOB_STATUS_CHANGE" and m["data"] == {"id": job, "status": status}:
            return events


def _bitmap_count(c: RawQmp, node: str, name: str) -> int:
    for n in c.cmd("query-named-block-nodes")["return"]:
        if n["node-name"] == node:
            for bm in n.get("dirty-bitmaps", []):
                if bm.get("name") == name:
                    return int(bm["count"])
    raise AssertionError(f"bitmap {name} not found")


def test_backup_onto_a_parent_of_its_source_is_refused(tmp_path: Path, blockd: Daemon) -> None:
    """It used to deadlock (progress 0, cancel ignored, SIGTERM ignored)."""
    img = tmp_path / "f.raw"
    qemu_img("create", "-q", "-f", "raw", img, "4M")
    a = _conn(blockd)
    a.cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
    a.cmd("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
    r = a.cmd("blockdev-backup", {"job-id": "j", "device": "f", "target": "r", "sync": "full"})
    assert r["error"]["desc"].startswith("Permission conflict on node 'f': permissions 'write'")
    assert a.cmd("query-block-jobs")["return"] == []
    assert blockd.stop() == 0
