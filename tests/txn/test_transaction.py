"""``transaction``: all-or-nothing preparation, completion modes, and the events of jobs in a
transaction, compared with qemu-storage-daemon 7.2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffsupport import (
    MiB,
    Session,
    blkdebug_raw_node,
    compare,
    norm,
    raw_image,
    raw_node,
    run_both,
)

SIZE = 8 * MiB


def _build(d: Path) -> None:
    raw_image(d / "src.raw", SIZE, [(0x5A, 0, 2 * MiB), (0x66, 6 * MiB, MiB)])
    for name in ("a", "b", "ta", "tb", "bad"):
        raw_image(d / f"{name}.raw", SIZE)


def _nodes(s: Session, d: Path) -> None:
    s.ok("blockdev-add", raw_node("src", d / "src.raw"))
    for name in ("a", "b", "ta", "tb"):
        s.ok("blockdev-add", raw_node(name, d / f"{name}.raw"))
    s.ok(
        "blockdev-add",
        blkdebug_raw_node("bad", d / "bad.raw", [{"event": "write_aio", "errno": 5}]),
    )


def _diff(res: dict[str, Any]) -> None:
    diffs = [(g, w) for g, w in zip(res["blockd"], res["qsd"], strict=True) if g != w]
    assert not diffs, "\n".join(f"blockd {g}\n   qsd {w}" for g, w in diffs)


def test_transaction_errors_and_rollback(tmp_path: Path) -> None:
    def act(kind: str, **data: Any) -> dict[str, Any]:
        return {"type": kind, "data": data}

    cases: list[dict[str, Any]] = [
        {"actions": []},
        {"actions": [act("block-dirty-bitmap-add", node="a", name="bm"), act("abort")]},
        {"actions": [act("block-dirty-bitmap-add", node="a", name="bm"), {"type": "abort"}]},
        {
            "actions": [
                act("block-dirty-bitmap-add", node="a", name="bm"),
                act("block-dirty-bitmap-add", node="a", name="bm"),
            ]
        },
        {
            "actions": [act("block-dirty-bitmap-add", node="a", name="bm")],
            "properties": {"completion-mode": "grouped"},
        },
        {"actions": [act("abort")], "properties": {"completion-mode": "grouped"}},
        {"actions": [{"type": "bogus", "data": {}}]},
        {"actions": [act("abort", x=1)]},
        {
            "actions": [
                act(
                    "blockdev-backup",
                    **{"job-id": "ja", "device": "a", "target": "ta", "sync": "full"},
                ),
                act("block-dirty-bitmap-add", node="a", name="bm"),
                act(
                    "blockdev-backup",
                    **{"job-id": "jb", "device": "a", "target": "nonexist", "sync": "full"},
                ),
            ]
        },
        {
            "actions": [
                act(
                    "blockdev-backup",
                    **{"job-id": "ja", "device": "a", "target": "ta", "sync": "full"},
                ),
                act("block-dirty-bitmap-add", node="a", name="bm"),
            ],
            "properties": {"completion-mode": "grouped"},
        },
        # bitmap actions undone by a later failure
        {"actions": [act("block-dirty-bitmap-add", node="b", name="keep")]},
        {
            "actions": [
                act("block-dirty-bitmap-disable", node="b", name="keep"),
                act("block-dirty-bitmap-clear", node="b", name="keep"),
                act("block-dirty-bitmap-remove", node="b", name="keep"),
                act("abort"),
            ]
        },
        {
            "actions": [
                act("block-dirty-bitmap-remove", node="b", name="keep"),
                act("block-dirty-bitmap-clear", node="b", name="keep"),
            ]
        },
        {
            "actions": [
                act("block-dirty-bitmap-add", node="b", name="t1"),
                act("block-dirty-bitmap-remove", node="b", name="t1"),
            ]
        },
        {
            "actions": [
                act("block-dirty-bitmap-add", node="b", name="m", disabled=True),
                act("block-dirty-bitmap-merge", node="b", target="m", bitmaps=["keep"]),
                act("block-dirty-bitmap-enable", node="b", name="m"),
            ]
        },
    ]

    def scenario(s: Session, d: Path) -> list[Any]:
        _nodes(s, d)
        s.ok("block-dirty-bitmap-add", {"node": "ta", "name": "dirt"})
        s.ok("blockdev-backup", {"job-id": "fill", "device": "src", "target": "b", "sync": "full"})
        s.wait_job("fill", "null")
        out: list[Any] = []
        for args in cases:
            r = s.cmd("transaction", args)
            s.drain(0.05)
            out.append([args, r.get("error", r.get("return"))])
            out.append([s.bitmaps(n) for n in ("a", "b")])
        out.append(s.ok("query-jobs"))
        out.append(s.names(True))
        return norm(out, d)

    _diff(run_both(tmp_path, _build, scenario))


def _two_incrementals(s: Session, d: Path, *, grouped: bool) -> dict[str, Any]:
    """Bitmaps ba (on a) and bb (on b) fully dirty; incremental a->ta (throttled, good) and
    b->bad (fails) in one transaction."""
    _nodes(s, d)
    s.ok("block-dirty-bitmap-add", {"node": "a", "name": "ba"})
    s.ok("block-dirty-bitmap-add", {"node": "b", "name": "bb"})
    for job, tgt in (("fa", "a"), ("fb", "b")):
        s.ok("blockdev-backup", {"job-id": job, "device": "src", "target": tgt, "sync": "full"})
        s.wait_job(job, "null")
    before = [s.bitmap("a", "ba"), s.bitmap("b", "bb")]
    args: dict[str, Any] = {
        "actions": [
            {
                "type": "blockdev-backup",
                "data": {
                    "job-id": "good",
                    "device": "a",
                    "target": "ta",
                    "sync": "incremental",
                    "bitmap": "ba",
                    "speed": 4 * MiB,
                },
            },
            {
                "type": "blockdev-backup",
                "data": {
                    "job-id": "bad",
                    "device": "b",
                    "target": "bad",
                    "sync": "incremental",
                    "bitmap": "bb",
                },
            },
        ]
    }
    if grouped:
        args["properties"] = {"completion-mode": "grouped"}
    s.ok("transaction", args)
    s.wait_job("good", "null")
    s.wait_job("bad", "null")
    ends = {
        e["data"]["device"]: (e["event"], e["data"].get("error"))
        for e in s.events
        if e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
        and e["data"]["device"] in ("good", "bad")
    }
    return {
        "events": [n for n in s.names() if "fa" not in n and "fb" not in n],
        "before": before,
        "after": [s.bitmap("a", "ba"), s.bitmap("b", "bb")],
        "ends": ends,
        "good_copied": compare(d / "src.raw", d / "ta.raw"),
    }


def _run_two_incrementals(
    tmp_path: Path, grouped: bool, good_end: tuple[str, None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run :func:`_two_incrementals` on both daemons; check how each job ended (the bad one
    with its write error, the good one with *good_end*) and the events; return the results."""
    res = run_both(tmp_path, _build, lambda s, d: _two_incrementals(s, d, grouped=grouped))
    b, q = res["blockd"], res["qsd"]
    assert (
        b["ends"]
        == q["ends"]
        == {"bad": ("BLOCK_JOB_COMPLETED", "Input/output error"), "good": good_end}
    )
    assert b["events"] == q["events"]
    return b, q


def test_grouped_incrementals_one_failing(tmp_path: Path) -> None:
    b, q = _run_two_incrementals(tmp_path, True, ("BLOCK_JOB_CANCELLED", None))
    assert b["after"] == b["before"] == q["after"]  # both bitmaps untouched


def test_individual_incrementals_one_failing(tmp_path: Path) -> None:
    b, q = _run_two_incrementals(tmp_path, False, ("BLOCK_JOB_COMPLETED", None))
    assert b["after"][0]["count"] == 0  # good one cleared its bitmap
    assert b["after"][1] == b["before"][1]  # bad one kept it
    assert b["after"] == q["after"]
    assert b["good_copied"] and q["good_copied"]


def test_grouped_success_and_manual_finalize(tmp_path: Path) -> None:
    def scenario(s: Session, d: Path) -> dict[str, Any]:
        _nodes(s, d)
        s.ok(
            "transaction",
            {
                "actions": [
                    {
                        "type": "blockdev-backup",
                        "data": {
                            "job-id": "ja",
                            "device": "src",
                            "target": "ta",
                            "sync": "full",
                            "auto-finalize": False,
                            "speed": 16 * MiB,
                        },
                    },
                    {
                        "type": "drive-backup",
                        "data": {
                            "job-id": "jb",
                            "device": "src",
                            "target": str(d / "db.raw"),
                            "sync": "full",
                            "auto-finalize": False,
                            "format": "raw",
                        },
                    },
                ],
                "properties": {"completion-mode": "grouped"},
            },
        )
        s.wait(lambda e: e["event"] == "BLOCK_JOB_PENDING" and e["data"]["id"] == "ja")
        s.wait(lambda e: e["event"] == "BLOCK_JOB_PENDING" and e["data"]["id"] == "jb")
        jobs = s.ok("query-jobs")
        s.ok("job-finalize", {"id": "ja"})
        s.drain(0.1)
        return {
            "events": s.names(True),
            "jobs": jobs,
            "same": [compare(d / "src.raw", d / "ta.raw"), compare(d / "src.raw", d / "db.raw")],
        }

    res = run_both(tmp_path, _build, scenario)
    assert res["blockd"]["events"] == res["qsd"]["events"]
    assert res["blockd"]["jobs"] == res["qsd"]["jobs"]
    assert all(res["blockd"]["same"]) and all(res["qsd"]["same"])
