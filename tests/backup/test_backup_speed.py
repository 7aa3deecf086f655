"""A backup's speed limit counts every byte the job copies, as in qemu-storage-daemon 7.2:
zero ranges as much as data, and what copy-before-write copied for a guest write (which itself
is never held back) as much as what the background copy moved.

Only lower bounds on the job's duration are checked (a slow machine only makes jobs longer);
each scenario also runs on QSD, which must meet the same bound."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from diffsupport import MiB, Session, compare, raw_image, raw_node, run_both
from support import qemu_io

SIZE = 4 * MiB
SPEED = 4 * MiB
#: At most one 100 ms slice's quota goes before the limit bites: a full copy of SIZE bytes
#: takes about (SIZE - SPEED / 10) / SPEED seconds; allow for rounding.
MIN_SECONDS = 0.7 * SIZE / SPEED


def _timed_backup(s: Session, d: Path, during: Any = None) -> dict[str, Any]:
    """Node ``src`` exists; add the target, run a throttled full backup (calling *during*
    right after the command returned) and time it from the command to the job's end."""
    s.ok("blockdev-add", raw_node("tgt", d / "tgt.raw"))
    t0 = time.monotonic()
    s.ok(
        "blockdev-backup",
        {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": SPEED},
    )
    if during is not None:
        during()
    s.wait_job("j", "null")
    elapsed = time.monotonic() - t0
    done = next(e for e in s.events if e["event"] == "BLOCK_JOB_COMPLETED")["data"]
    return {"elapsed": elapsed, "done": done, "events": s.names()}


def _check_timed(res: dict[str, Any], not_same: str = "") -> None:
    """Both targets right (*not_same*: what a wrong one means), neither backup faster than
    the speed allows, and the same end and events."""
    for kind in ("qsd", "blockd"):
        r = res[kind]
        assert r["same"], f"{kind}: {not_same}" if not_same else kind
        assert r["elapsed"] >= MIN_SECONDS, f"{kind}: {SIZE} bytes in {r['elapsed']:.2f} s"
    assert res["blockd"]["done"] == res["qsd"]["done"]
    assert res["blockd"]["events"] == res["qsd"]["events"]


def test_zero_ranges_count_against_the_speed(tmp_path: Path) -> None:
    """A mostly sparse source: the zero ranges take their share of the time."""

    def build(d: Path) -> None:
        raw_image(d / "src.raw", SIZE, [(0x5A, MiB, 256 * 1024)])
        raw_image(d / "tgt.raw", SIZE)

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        s.ok("blockdev-add", raw_node("src", d / "src.raw"))
        res = _timed_backup(s, d)
        res["same"] = compare(d / "src.raw", d / "tgt.raw")
        return res

    _check_timed(run_both(tmp_path, build, scenario))


def test_copy_before_write_counts_against_the_speed(tmp_path: Path) -> None:
    """A guest write of the second half right after the start: copy-before-write copies it at
    once, and the background copy of the first half then pays for those bytes too."""

    def build(d: Path) -> None:
        raw_image(d / "src.raw", SIZE, [(0x5A, 0, SIZE)])
        raw_image(d / "tgt.raw", SIZE)
        raw_image(d / "snap.raw", SIZE, [(0x5A, 0, SIZE)])

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        nbd = d / "nbd.sock"
        s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}})

        def guest_write() -> None:
            uri = f"nbd+unix:///src?socket={nbd}"
            qemu_io("-f", "raw", "-c", f"write -P 0x66 {SIZE // 2} {SIZE // 2}", uri)

        s.ok("blockdev-add", raw_node("src", d / "src.raw"))
        s.ok("block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True})
        res = _timed_backup(s, d, guest_write)
        res["same"] = compare(d / "snap.raw", d / "tgt.raw")
        return res

    _check_timed(run_both(tmp_path, build, scenario), "the target is not the image at the start")
