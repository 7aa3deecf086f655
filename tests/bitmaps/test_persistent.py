"""Persistent dirty bitmaps in qcow2: they survive a clean restart, qemu-img and
qemu-storage-daemon read what blockd stored (and the other way round), and after ``kill -9``
they come back ``inconsistent``, refuse every use but removal, and can be removed."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from diffsupport import MiB, Session, qcow2_node, start
from support import Daemon, check_image, qemu_img, qemu_io

SIZE = 64 * MiB


def info(path: Path) -> dict[str, Any]:
    out = qemu_img("info", "-U", "--output=json", path).stdout
    return json.loads(out)


def image_bitmaps(path: Path) -> dict[str, dict[str, Any]]:
    data = info(path)["format-specific"]["data"]
    return {b["name"]: b for b in data.get("bitmaps", [])}


def export(s: Session, d: Path, node: str) -> Path:
    sock = d / "nbd.sock"
    s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    s.ok("block-export-add", {"type": "nbd", "id": "e", "node-name": node, "writable": True})
    return sock


def nbd_writes(sock: Path, writes: list[tuple[int, int]]) -> None:
    cmds: list[str] = []
    for off, n in writes:
        cmds += ["-c", f"write -P 0x5a {off} {n}"]
    qemu_io("-f", "raw", *cmds, f"nbd+unix:///d?socket={sock}")


def unexport(s: Session) -> None:
    s.ok("block-export-del", {"id": "e"})
    s.wait(lambda e: e.get("event") == "BLOCK_EXPORT_DELETED")
    s.ok("nbd-server-stop")


def counts(s: Session, node: str) -> dict[str, tuple[int, bool, bool]]:
    return {
        b["name"]: (b["count"], b["recording"], bool(b.get("inconsistent")))
        for b in s.bitmaps(node)
    }


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", p, str(SIZE))
    return p


def test_round_trip_through_qemu_img_qsd_and_restart(tmp_path: Path, img: Path) -> None:
    # 1. qemu-img adds one (empty, enabled), QSD fills another with real writes.
    qemu_img("bitmap", "--add", "-g", "65536", img, "from-img")
    qsd = start("qsd", tmp_path)
    s = Session(qsd.sock)
    s.ok("blockdev-add", qcow2_node("d", img))
    s.ok(
        "block-dirty-bitmap-add",
        {"node": "d", "name": "from-qsd", "persistent": True, "granularity": 4096},
    )
    sock = export(s, tmp_path, "d")
    qsd_writes = [(0, 4096), (5 * MiB + 17, 70000), (SIZE - 512, 512)]
    nbd_writes(sock, qsd_writes)
    qsd_counts = counts(s, "d")
    unexport(s)
    s.ok("blockdev-del", {"node-name": "d"})
    s.close()
    qsd.stop()
    assert qsd_counts["from-qsd"][0] > 0
    assert set(image_bitmaps(img)) == {"from-img", "from-qsd"}

    # 2. blockd loads both with the same counts; they are in use while it has the image.
    b = start("blockd", tmp_path)
    s = Session(b.sock)
    s.ok("blockdev-add", qcow2_node("d", img))
    assert counts(s, "d") == qsd_counts
    flags = {n: x["flags"] for n, x in image_bitmaps(img).items()}
    assert flags == {"from-img": ["in-use", "auto"], "from-qsd": ["in-use", "auto"]}
    node = next(n for n in s.ok("query-named-block-nodes") if n["node-name"] == "d")
    shown = node["image"]["format-specific"]["data"]["bitmaps"]
    assert {x["name"] for x in shown} == {"from-img", "from-qsd"}
    # New ones, one disabled, more writes; then a clean close stores everything.
    s.ok("block-dirty-bitmap-add", {"node": "d", "name": "mine", "persistent": True})
    s.ok(
        "block-dirty-bitmap-add",
        {"node": "d", "name": "frozen", "persistent": True, "granularity": 512},
    )
    s.ok("block-dirty-bitmap-add", {"node": "d", "name": "volatile"})
    sock = export(s, tmp_path, "d")
    nbd_writes(sock, [(1 * MiB, 3 * MiB), (40 * MiB + 1, 1)])
    s.ok("block-dirty-bitmap-disable", {"node": "d", "name": "frozen"})
    nbd_writes(sock, [(50 * MiB, 64 * 1024)])
    before = counts(s, "d")
    unexport(s)
    s.ok("blockdev-del", {"node-name": "d"})
    assert "Traceback" not in b.log_text()
    s.close()
    b.stop()
    stored = image_bitmaps(img)
    assert set(stored) == {"from-img", "from-qsd", "mine", "frozen"}
    assert all("in-use" not in x["flags"] for x in stored.values())
    assert stored["frozen"]["flags"] == [] and stored["mine"]["flags"] == ["auto"]
    assert stored["frozen"]["granularity"] == 512
    res = check_image(img)
    assert res["rc"] == 0 and not res.get("leaks") and not res.get("corruptions"), res

    # 3. blockd again: same bitmaps, same counts, disabled stays disabled.
    b = start("blockd", tmp_path)
    s = Session(b.sock)
    s.ok("blockdev-add", qcow2_node("d", img))
    again = counts(s, "d")
    before.pop("volatile")
    assert again == before
    s.ok("blockdev-del", {"node-name": "d"})
    s.close()
    b.stop()

    # 4. QSD reads what blockd stored, count for count.
    qsd = start("qsd", tmp_path)
    s = Session(qsd.sock)
    s.ok("blockdev-add", qcow2_node("d", img))
    assert counts(s, "d") == before
    s.ok("blockdev-del", {"node-name": "d"})
    s.close()
    qsd.stop()
    res = check_image(img)
    assert res["rc"] == 0 and not res.get("leaks") and not res.get("corruptions"), res


def _kill(d: Daemon) -> None:
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()


def test_after_kill_9_bitmaps_are_inconsistent_and_only_removable(
    tmp_path: Path, img: Path
) -> None:
    qemu_img("bitmap", "--add", img, "b0")
    qemu_img("bitmap", "--add", img, "b1")
    b = start("blockd", tmp_path)
    s = Session(b.sock)
    s.ok("blockdev-add", qcow2_node("d", img))
    sock = export(s, tmp_path, "d")
    nbd_writes(sock, [(0, MiB)])
    assert counts(s, "d")["b0"][0] == MiB
    _kill(b)
    s.close()
    assert all("in-use" in x["flags"] for x in image_bitmaps(img).values())
    res = check_image(img)
    assert not res.get("corruptions") and not res.get("check-errors"), res

    results: dict[str, list[Any]] = {}
    for kind in ("blockd", "qsd"):
        d = start(kind, tmp_path)
        s = Session(d.sock)
        s.ok("blockdev-add", qcow2_node("d", img))
        out: list[Any] = [counts(s, "d")]
        for cmd, args in [
            ("block-dirty-bitmap-clear", {"node": "d", "name": "b0"}),
            ("block-dirty-bitmap-enable", {"node": "d", "name": "b0"}),
            ("block-dirty-bitmap-disable", {"node": "d", "name": "b0"}),
            ("block-dirty-bitmap-merge", {"node": "d", "target": "b0", "bitmaps": ["b1"]}),
            ("block-dirty-bitmap-add", {"node": "d", "name": "t"}),
            ("block-dirty-bitmap-merge", {"node": "d", "target": "t", "bitmaps": ["b1"]}),
        ]:
            r = s.cmd(cmd, args)
            out.append(r.get("error", {}).get("desc", "ok"))
        s.ok("block-dirty-bitmap-remove", {"node": "d", "name": "t"})
        s.ok("block-dirty-bitmap-remove", {"node": "d", "name": "b0"})
        out.append(sorted(image_bitmaps(img)))
        s.ok("blockdev-del", {"node-name": "d"})
        s.close()
        d.stop()
        out.append(sorted(image_bitmaps(img)))
        results[kind] = out
        if kind == "blockd":
            # Put b0 back, in use, for QSD to see the same starting point.
            qemu_img("bitmap", "--add", img, "b0")
            _mark_all_in_use(tmp_path, img)
    assert results["blockd"] == results["qsd"], results
    assert results["blockd"][0] == {"b0": (0, False, True), "b1": (0, False, True)}
    assert "inconsistent and cannot be used" in results["blockd"][1]
    # b1 stays inconsistent (in use) in the image until someone removes it.
    assert results["blockd"][-1] == ["b1"]
    assert "in-use" in image_bitmaps(img)["b1"]["flags"]
    res = check_image(img)
    assert not res.get("corruptions") and not res.get("check-errors"), res


def _mark_all_in_use(tmp: Path, img: Path) -> None:
    """Open the image in blockd and kill it: every bitmap is left in use."""
    d = start("blockd", tmp)
    s = Session(d.sock)
    s.ok("blockdev-add", qcow2_node("d", img))
    _kill(d)
    s.close()


def test_persistent_errors_match_qsd(tmp_path: Path) -> None:
    results: dict[str, list[str]] = {}
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        d.mkdir()
        v2 = d / "v2.qcow2"
        v3 = d / "v3.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", v2, str(SIZE))
        qemu_img("create", "-f", "qcow2", v3, str(SIZE))
        daemon = start(kind, d)
        s = Session(daemon.sock)
        s.ok("blockdev-add", qcow2_node("v2", v2))
        s.ok("blockdev-add", qcow2_node("v3", v3))
        out = []
        for args in [
            {"node": "v2", "name": "p", "persistent": True},
            {"node": "v3", "name": "p", "persistent": True},
            {"node": "v3", "name": "p", "persistent": True},
            {"node": "v3", "name": "q", "persistent": True, "granularity": 2**31},
            {"node": "v3", "name": "n" * 1023, "persistent": True},
        ]:
            r = s.cmd("block-dirty-bitmap-add", args)
            out.append(r.get("error", {}).get("desc", "ok"))
        # Removing a stored persistent bitmap takes it out of the image at once.
        s.ok("blockdev-del", {"node-name": "v3"})
        s.ok("blockdev-add", qcow2_node("v3", v3))
        out.append(",".join(sorted(image_bitmaps(v3))))
        s.ok("block-dirty-bitmap-remove", {"node": "v3", "name": "p"})
        out.append(",".join(sorted(image_bitmaps(v3))))
        s.close()
        daemon.stop()
        res = check_image(v3)
        assert res["rc"] == 0 and not res.get("leaks"), (kind, res)
        results[kind] = out
    assert results["blockd"] == results["qsd"], results
    assert "qcow2 v2" in results["blockd"][0]


def test_kill_9_at_random_moments_never_leaves_wrong_bitmaps(tmp_path: Path, img: Path) -> None:
    """Each run opens, dirties known ranges, and closes; a kill lands anywhere, also inside
    the store. After it the image checks clean (leaks aside) and every bitmap is either
    flagged in use or holds exactly the bits written."""
    rng = random.Random(7)
    written: list[tuple[int, int]] = []
    outcomes = {"stored": 0, "in-use": 0, "absent": 0}
    g = 65536
    for run in range(8):
        d = start("blockd", tmp_path)
        s = Session(d.sock)
        s.ok("blockdev-add", qcow2_node("d", img))
        names = {b["name"] for b in s.bitmaps("d")}
        for b in list(names):
            if counts(s, "d")[b][2]:
                s.ok("block-dirty-bitmap-remove", {"node": "d", "name": b})
                names.discard(b)
        if "k" not in names:
            s.ok("block-dirty-bitmap-add", {"node": "d", "name": "k", "persistent": True})
            written = []
        sock = export(s, tmp_path, "d")
        new = [(rng.randrange(0, SIZE // g) * g, g * rng.randint(1, 8)) for _ in range(20)]
        nbd_writes(sock, [(o, min(n, SIZE - o)) for o, n in new])
        written += new
        unexport(s)
        if run % 4 == 3:
            s.ok("blockdev-del", {"node-name": "d"})  # surely stored, however slow the machine
        else:
            s.raw.send({"execute": "blockdev-del", "arguments": {"node-name": "d"}})
            time.sleep(rng.uniform(0, 0.003))
        _kill(d)
        s.close()
        res = check_image(img)
        assert not res.get("corruptions") and not res.get("check-errors"), (run, res)
        bms = image_bitmaps(img)
        outcomes[
            "absent" if "k" not in bms else "in-use" if "in-use" in bms["k"]["flags"] else "stored"
        ] += 1
        if "k" in bms and "in-use" not in bms["k"]["flags"]:
            # Stored: it must hold exactly what was written.
            d = start("blockd", tmp_path)
            s = Session(d.sock)
            s.ok("blockdev-add", qcow2_node("d", img))
            expect = set()
            for o, n in written:
                expect.update(range(o // g, -(-min(o + n, SIZE) // g)))
            assert counts(s, "d")["k"][0] == len(expect) * g, run
            s.ok("blockdev-del", {"node-name": "d"})
            s.close()
            d.stop()
    print("outcomes:", outcomes)
    # Kills after a completed store must occur, or the content check never ran (kills
    # before it are the common case; the in-use side is covered by the test above too).
    assert outcomes["stored"] >= 1, outcomes


def test_failed_store_is_an_error_and_keeps_node_and_bitmap(tmp_path: Path, img: Path) -> None:
    """The file fails every flush: blockdev-del must say the bitmaps could not be stored and
    keep the node (and the bitmap with its bits) instead of closing with them lost."""
    b = start("blockd", tmp_path)
    s = Session(b.sock)
    s.ok(
        "blockdev-add",
        {
            "driver": "qcow2",
            "node-name": "d",
            "file": {
                "driver": "blkdebug",
                "node-name": "dbg",
                "inject-error": [{"event": "none", "iotype": "flush", "errno": 5, "once": False}],
                "image": {"driver": "file", "filename": str(img)},
            },
        },
    )
    s.ok("block-dirty-bitmap-add", {"node": "d", "name": "p", "persistent": True})
    err = s.err("blockdev-del", {"node-name": "d"})
    assert err.startswith("Failed to update bitmap extension"), err
    assert s.bitmap("d", "p")["persistent"]
    s.ok("block-dirty-bitmap-remove", {"node": "d", "name": "p"})
    s.cmd("blockdev-del", {"node-name": "d"})  # the close's own flush fails too; either way
    assert s.ok("query-named-block-nodes") == []
    s.close()
    b.stop()
    assert "Traceback" not in b.log_text()
    assert image_bitmaps(img) == {}
    res = check_image(img)
    assert not res.get("corruptions") and not res.get("check-errors"), res
