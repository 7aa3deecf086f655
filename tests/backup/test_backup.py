"""blockdev-backup / drive-backup end to end, each scenario played against blockd and
qemu-storage-daemon 7.2: same events (names and order), same errors, same target contents,
and targets equal to the source (qemu-img compare)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from diffsupport import (
    MiB,
    Session,
    blkdebug_raw_node,
    compare,
    completed,
    norm,
    qcow2_image,
    qcow2_node,
    raw_image,
    raw_node,
    run_both,
)

SIZE = 8 * MiB
DATA = [(0x5A, 0, 3 * MiB), (0x11, 5 * MiB, 64 * 1024), (0x22, 7 * MiB + 4096, 4096)]


def _build(d: Path) -> None:
    raw_image(d / "src.raw", SIZE, DATA)
    for name in ("tgt", "t2", "bad"):
        raw_image(d / f"{name}.raw", SIZE)
    raw_image(d / "small.raw", MiB)


def _add_nodes(s: Session, d: Path) -> None:
    s.ok("blockdev-add", raw_node("src", d / "src.raw"))
    s.ok("blockdev-add", raw_node("tgt", d / "tgt.raw"))
    s.ok("blockdev-add", raw_node("t2", d / "t2.raw"))
    s.ok("blockdev-add", raw_node("small", d / "small.raw"))


def _backup(s: Session, job: str, device: str, target: str, sync: str, **extra: Any) -> None:
    """blockdev-backup *device* -> *target*, then wait until the job is gone."""
    args = {"job-id": job, "device": device, "target": target, "sync": sync, **extra}
    s.ok("blockdev-backup", args)
    s.wait_job(job, "null")


def _same_events(res: dict[str, Any], exact_replies: bool = True) -> None:
    """Same events in the same order; with *exact_replies* also at the same places relative
    to the command replies."""
    got, want = res["blockd"]["events"], res["qsd"]["events"]
    if not exact_replies:
        got = [e for e in got if e[:2] not in ("->", "<-")]
        want = [e for e in want if e[:2] not in ("->", "<-")]
    assert got == want


@pytest.mark.parametrize("sync", ["full", "top"])
def test_backup_sync_full_top(tmp_path: Path, sync: str) -> None:
    def scenario(s: Session, d: Path) -> dict[str, Any]:
        _add_nodes(s, d)
        _backup(s, "j", "src", "tgt", sync)
        return {
            "events": s.names(True),
            "done": completed(s, "j"),
            "same": compare(d / "src.raw", d / "tgt.raw"),
        }

    res = run_both(tmp_path, _build, scenario)
    _same_events(res)
    assert res["blockd"]["done"] == res["qsd"]["done"]
    assert res["blockd"]["same"] and res["qsd"]["same"]


def test_backup_sync_none_runs_until_cancelled(tmp_path: Path) -> None:
    def scenario(s: Session, d: Path) -> dict[str, Any]:
        _add_nodes(s, d)
        s.ok("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "none"})
        jobs = s.ok("query-block-jobs")
        s.ok("job-cancel", {"id": "j"})
        s.wait_job("j", "null")
        return {
            "events": s.names(True),
            "jobs": jobs,
            "untouched": compare(d / "tgt.raw", d / "t2.raw"),
        }

    res = run_both(tmp_path, _build, scenario)
    _same_events(res)
    assert res["blockd"]["jobs"] == res["qsd"]["jobs"]
    assert res["blockd"]["untouched"] and res["qsd"]["untouched"]


def _dirty_all(s: Session, node: str, bitmap: str, via: str = "t2") -> None:
    """Fill *bitmap* on *node* without a guest writer: a full backup *via* -> *node* writes
    every cluster of *node*, and its recording bitmap sees each write."""
    _backup(s, "fill", via, node, "full")


@pytest.mark.parametrize(
    ("sync", "mode"),
    [
        ("incremental", None),
        ("bitmap", "on-success"),
        ("bitmap", "never"),
        ("bitmap", "always"),
        ("full", "on-success"),
        ("full", "always"),
    ],
)
def test_backup_with_bitmap_modes(tmp_path: Path, sync: str, mode: str | None) -> None:
    """The user's bitmap after a successful backup, per sync and bitmap-mode."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        _add_nodes(s, d)
        s.ok("block-dirty-bitmap-add", {"node": "tgt", "name": "b0"})
        _dirty_all(s, "tgt", "b0", via="src")
        before = s.bitmap("tgt", "b0")
        extra = {} if mode is None else {"bitmap-mode": mode}
        _backup(s, "j", "tgt", "t2", sync, bitmap="b0", **extra)
        return {
            "events": s.names(True),
            "before": before,
            "after": s.bitmaps("tgt"),
            "done": completed(s, "j"),
            "same": compare(d / "src.raw", d / "t2.raw"),
        }

    res = run_both(tmp_path, _build, scenario)
    _same_events(res)
    for key in ("before", "after", "done"):
        assert res["blockd"][key] == res["qsd"][key], key
    assert res["blockd"]["same"] and res["qsd"]["same"]


def test_failed_incremental_keeps_bitmap_and_retry_succeeds(tmp_path: Path) -> None:
    """A backup onto a target whose writes fail ends with BLOCK_JOB_COMPLETED carrying the
    error; the bitmap keeps every bit; the retry onto a good target succeeds and clears it."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        _add_nodes(s, d)
        s.ok(
            "blockdev-add",
            blkdebug_raw_node("bad", d / "bad.raw", [{"event": "write_aio", "errno": 5}]),
        )
        s.ok("block-dirty-bitmap-add", {"node": "tgt", "name": "b0"})
        _dirty_all(s, "tgt", "b0", via="src")
        before = s.bitmap("tgt", "b0")
        _backup(s, "inc1", "tgt", "bad", "incremental", bitmap="b0")
        failed = s.bitmap("tgt", "b0")
        _backup(s, "inc2", "tgt", "t2", "incremental", bitmap="b0")
        return {
            "events": s.names(True),
            "before": before,
            "failed": failed,
            "after": s.bitmap("tgt", "b0"),
            "same": compare(d / "src.raw", d / "t2.raw"),
        }

    res = run_both(tmp_path, _build, scenario)
    _same_events(res)
    b = res["blockd"]
    assert "BLOCK_JOB_COMPLETED:inc1:error=Input/output error" in b["events"]
    assert b["failed"] == b["before"] and b["before"]["count"] == SIZE
    assert b["after"]["count"] == 0
    for key in ("before", "failed", "after"):
        assert b[key] == res["qsd"][key], key
    assert b["same"] and res["qsd"]["same"]


def test_target_error_stop_then_resume(tmp_path: Path) -> None:
    def scenario(s: Session, d: Path) -> dict[str, Any]:
        _add_nodes(s, d)
        s.ok(
            "blockdev-add",
            blkdebug_raw_node(
                "bad", d / "bad.raw", [{"event": "write_aio", "errno": 5, "once": True}]
            ),
        )
        s.ok(
            "blockdev-backup",
            {
                "job-id": "j",
                "device": "src",
                "target": "bad",
                "sync": "full",
                "on-target-error": "stop",
                "auto-dismiss": False,
            },
        )
        s.wait_job("j", "paused")
        s.wait(
            lambda e: (
                e["event"] == "JOB_STATUS_CHANGE"
                and e["data"]["status"] == "paused"
                and any(x["event"] == "BLOCK_JOB_ERROR" for x in s.events)
            )
        )
        info = s.ok("query-block-jobs")[0]
        s.ok("block-job-resume", {"device": "j"})
        s.wait_job("j", "concluded")
        final = s.ok("query-block-jobs")[0]
        s.ok("job-dismiss", {"id": "j"})
        return {
            "events": s.names(True),
            "stopped": (info["status"], info["paused"], info["io-status"]),
            "final": final,
            "same": compare(d / "src.raw", d / "bad.raw"),
        }

    res = run_both(tmp_path, _build, scenario)
    # blockd's job core emits ``running`` after the resume reply, QSD before it.
    _same_events(res, exact_replies=False)
    assert res["blockd"]["stopped"] == res["qsd"]["stopped"] == ("paused", True, "failed")
    assert res["blockd"]["final"] == res["qsd"]["final"]
    assert res["blockd"]["same"] and res["qsd"]["same"]


def test_source_error_report_and_ignore(tmp_path: Path) -> None:
    def scenario(s: Session, d: Path) -> dict[str, Any]:
        s.ok(
            "blockdev-add",
            blkdebug_raw_node(
                "src", d / "src.raw", [{"event": "read_aio", "errno": 5, "once": True}]
            ),
        )
        s.ok("blockdev-add", raw_node("tgt", d / "tgt.raw"))
        s.ok("blockdev-add", raw_node("t2", d / "t2.raw"))
        _backup(s, "j1", "src", "tgt", "full", **{"on-source-error": "ignore"})
        s.ok("blockdev-del", {"node-name": "src"})
        s.ok(
            "blockdev-add",
            blkdebug_raw_node("src", d / "src.raw", [{"event": "read_aio", "errno": 5}]),
        )
        _backup(s, "j2", "src", "t2", "full")
        return {"events": s.names(True), "same": compare(d / "src.raw", d / "tgt.raw")}

    res = run_both(tmp_path, _build, scenario)
    # An immediate read error may beat the reply in QSD (its job runs synchronously at first).
    _same_events(res, exact_replies=False)
    assert res["blockd"]["same"] and res["qsd"]["same"]


BACKUP_ERRORS: list[dict[str, Any]] = [
    {"device": "src", "target": "small", "sync": "full"},
    {"device": "src", "target": "ro", "sync": "full"},
    {"device": "src", "target": "src", "sync": "full"},
    {"device": "nonode", "target": "tgt", "sync": "full"},
    {"device": "src", "target": "nonode", "sync": "full"},
    {"device": "src", "target": "tgt", "sync": "incremental"},
    {"device": "src", "target": "tgt", "sync": "bitmap"},
    {"device": "src", "target": "tgt", "sync": "full", "bitmap": "nob"},
    {"device": "src", "target": "tgt", "sync": "full", "bitmap": "tb", "bitmap-mode": "never"},
    {
        "device": "src",
        "target": "tgt",
        "sync": "incremental",
        "bitmap": "b0",
        "bitmap-mode": "always",
    },
    {"device": "src", "target": "tgt", "sync": "bitmap", "bitmap": "b0"},
    {"device": "src", "target": "tgt", "sync": "full", "bitmap-mode": "never"},
    {"device": "src", "target": "tgt", "sync": "none", "bitmap": "b0"},
    {"device": "src", "target": "tgt", "sync": "none", "bitmap": "b0", "bitmap-mode": "always"},
    {"device": "src", "target": "tgt", "sync": "full", "bitmap": "b0", "bitmap-mode": "never"},
    {"device": "src", "target": "tgt", "sync": "top", "bitmap": "b0", "bitmap-mode": "never"},
    {"device": "src", "target": "tgt", "sync": "full", "compress": True},
    {"device": "src", "target": "tgt", "sync": "full", "x-perf": {"max-workers": 0}},
    {"device": "src", "target": "tgt", "sync": "full", "x-perf": {"max-chunk": -1}},
    {"device": "src", "target": "tgt", "sync": "full", "x-perf": {"max-chunk": 4096}},
    {"device": "src", "target": "tgt", "sync": "full", "filter-node-name": "1bad"},
    {"device": "src", "target": "tgt", "sync": "full", "filter-node-name": "src"},
    {"device": "src", "target": "tgt", "sync": "full", "job-id": ""},
    {"device": "src", "target": "tgt", "sync": "full", "job-id": "1abc"},
    {"device": "src", "target": "tgt", "sync": "full", "speed": -1},
    {"device": "src", "target": "tgt", "sync": "bogus"},
    {"device": "src", "target": "tgt"},
]


def test_backup_command_errors_match_qsd(tmp_path: Path) -> None:
    def scenario(s: Session, d: Path) -> list[Any]:
        _add_nodes(s, d)
        s.ok("blockdev-add", raw_node("ro", d / "t2.raw", **{"read-only": True}))
        s.ok("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
        s.ok("block-dirty-bitmap-add", {"node": "tgt", "name": "tb"})
        out: list[Any] = []
        for i, args in enumerate(BACKUP_ERRORS):
            args = {"job-id": f"x{i}", **args}
            r = s.cmd("blockdev-backup", args)
            out.append([args, r.get("error", r.get("return"))])
        s.ok(
            "blockdev-backup",
            {"job-id": "busy", "device": "src", "target": "tgt", "sync": "full", "speed": 1},
        )
        for args in [
            {"job-id": "busy", "device": "src", "target": "t2", "sync": "full"},
            {"job-id": "y1", "device": "tgt", "target": "t2", "sync": "full"},
            {"job-id": "y2", "device": "t2", "target": "tgt", "sync": "full"},
        ]:
            r = s.cmd("blockdev-backup", args)
            out.append([args, r.get("error", r.get("return"))])
        s.ok("job-cancel", {"id": "busy"})
        s.wait_job("busy", "null")
        out.append(s.names(True))
        return norm(out, d)

    res = run_both(tmp_path, _build, scenario)
    diffs = [(g, w) for g, w in zip(res["blockd"], res["qsd"], strict=True) if g != w]
    assert not diffs, "\n".join(f"blockd {g}\n   qsd {w}" for g, w in diffs)


def test_drive_backup_raw(tmp_path: Path) -> None:
    def scenario(s: Session, d: Path) -> dict[str, Any]:
        s.ok(
            "blockdev-add",
            {
                **raw_node("src", d / "src.raw"),
                "file": {"driver": "file", "node-name": "srcf", "filename": str(d / "src.raw")},
            },
        )
        out: list[Any] = []
        for args in [
            {"job-id": "d1", "device": "src", "target": str(d / "d1.raw"), "sync": "full"},
            {"job-id": "d2", "device": "srcf", "target": str(d / "d2.img"), "sync": "full"},
            {
                "job-id": "d3",
                "device": "src",
                "target": str(d / "d3.raw"),
                "sync": "top",
                "format": "raw",
            },
            {
                "job-id": "d4",
                "device": "src",
                "target": str(d / "tgt.raw"),
                "sync": "full",
                "mode": "existing",
                "format": "raw",
            },
            {
                "job-id": "e1",
                "device": "src",
                "target": str(d / "nonexist.raw"),
                "sync": "full",
                "mode": "existing",
            },
            {"job-id": "e2", "device": "src", "target": str(d / "nodir" / "x.raw"), "sync": "full"},
            {
                "job-id": "e3",
                "device": "src",
                "target": str(d / "e3.raw"),
                "sync": "full",
                "format": "bogus",
            },
            {
                "job-id": "e4",
                "device": "src",
                "target": str(d / "e4.raw"),
                "sync": "none",
                "format": "raw",
            },
            {
                "job-id": "e5",
                "device": "src",
                "target": str(d / "small.raw"),
                "sync": "full",
                "mode": "existing",
                "format": "raw",
            },
            {"job-id": "e6", "device": "nonode", "target": str(d / "e6.raw"), "sync": "full"},
        ]:
            r = s.cmd("drive-backup", args)
            if "return" in r:
                s.wait_job(args["job-id"], "null")
            out.append([args["job-id"], r.get("error", r.get("return"))])
        nodes = sorted(n["node-name"] for n in s.ok("query-named-block-nodes"))
        same = [compare(d / "src.raw", d / n) for n in ("d1.raw", "d2.img", "d3.raw", "tgt.raw")]
        return {"out": norm(out, d), "events": s.names(True), "nodes": nodes, "same": same}

    res = run_both(tmp_path, _build, scenario)
    assert res["blockd"]["out"] == res["qsd"]["out"]
    _same_events(res)
    assert res["blockd"]["nodes"] == ["src", "srcf"]
    assert all(res["blockd"]["same"]) and all(res["qsd"]["same"])


# -- qcow2 variants: run automatically once blockd has the qcow2 driver ----------------------


def _build_qcow2(d: Path) -> None:
    qcow2_image(d / "base.qcow2", SIZE, [(0x33, 0, 2 * MiB), (0x44, 6 * MiB, MiB)])
    qcow2_image(d / "src.qcow2", SIZE, [(0x5A, MiB, 2 * MiB)], backing=d / "base.qcow2")
    qcow2_image(d / "tgt.qcow2", SIZE)
    qcow2_image(d / "top.qcow2", SIZE, backing=d / "base.qcow2")


@pytest.mark.parametrize("sync", ["full", "top"])
def test_qcow2_backup(tmp_path: Path, sync: str) -> None:
    def scenario(s: Session, d: Path) -> dict[str, Any]:
        s.ok("blockdev-add", qcow2_node("src", d / "src.qcow2"))
        tgt = "tgt.qcow2" if sync == "full" else "top.qcow2"
        s.ok("blockdev-add", qcow2_node("tgt", d / tgt, backing=None))
        _backup(s, "j", "src", "tgt", sync)
        s.ok("blockdev-del", {"node-name": "tgt"})
        from support import qemu_img

        same = compare(d / "src.qcow2", d / tgt, "qcow2", "qcow2")
        size = qemu_img("info", "--output=json", d / tgt).stdout
        return {"events": s.names(True), "same": same, "info": size}

    res = run_both(tmp_path, _build_qcow2, scenario)
    _same_events(res)
    assert res["qsd"]["same"], "QSD reference run failed"
    assert res["blockd"]["same"]
