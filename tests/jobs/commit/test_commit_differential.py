"""block-commit side by side with qemu-storage-daemon 7.2 (qsd-transcripts.md commit_* and
commit_stream_errors): intermediate commit with its commit_top filter, active commit with
mirror_top, READY, complete and cancel; events, graph during and after, image headers and
contents must be the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from chainsupport import settled_offset
from diffsupport import MiB, Session, compare, nbd_write, qcow2_image, qcow2_node
from jobdiff import add_chain, backing_chain, both, chain, chain_of, events, graph, header
from support import qemu_img

pytestmark = [pytest.mark.qsd]


def _flat(d: Path) -> Path:
    """The chain's contents as one raw image, taken before the job."""
    qemu_img("convert", "-f", "qcow2", "-O", "raw", d / "top.qcow2", d / "before.raw")
    return d / "before.raw"


def _build(d: Path) -> None:
    chain(d)
    _flat(d)


def test_intermediate_commit(tmp_path: Path) -> None:
    """mid into base: ends by itself, top then backs onto base (header rewritten), mid
    keeps its backing; the chain reads the same as before."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        add_chain(s, d)
        s.ok(
            "block-commit",
            {"job-id": "cm0", "device": "top", "top-node": "mid", "base-node": "base"},
        )
        s.wait_job("cm0", "null")
        return {"events": events(s), "after": graph(s), "top": header(d / "top.qcow2")}

    both(tmp_path, _build, scenario)
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        assert backing_chain(d / "top.qcow2") == [
            ("top.qcow2", str(d / "base.qcow2")),
            ("base.qcow2", None),
        ]
        assert compare(d / "before.raw", d / "top.qcow2", "raw", "qcow2")


def test_intermediate_commit_filter_name_backing_file(tmp_path: Path) -> None:
    """A throttled commit shows its named commit_top filter; backing-file is what the
    overlay's header records."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        add_chain(s, d)
        s.ok(
            "block-commit",
            {
                "job-id": "cm0",
                "device": "top",
                "top-node": "mid",
                "base-node": "base",
                "filter-node-name": "cf",
                "backing-file": "base.qcow2",
                "speed": 4 * MiB,
            },
        )
        during = graph(s)
        s.ok("block-job-set-speed", {"device": "cm0", "speed": 0})
        s.wait_job("cm0", "null")
        return {"events": events(s), "during": during, "after": graph(s)}

    both(tmp_path, _build, scenario)
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        assert header(d / "top.qcow2")["backing-filename"] == "base.qcow2"
        assert compare(d / "before.raw", d / "top.qcow2", "raw", "qcow2")


def test_active_commit_complete_pivots_export(tmp_path: Path) -> None:
    """top and mid into base: READY with len = what is committed; complete moves the export
    onto base, which then holds everything, writes made before completion included."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        add_chain(s, d)
        sock = d / "nbd.sock"
        s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "top", "writable": True})
        s.ok("block-commit", {"job-id": "cm1", "device": "top"})
        s.wait_job("cm1", "ready")
        during = graph(s)
        jobs = s.ok("query-block-jobs")
        nbd_write(sock, "top", 0x5D, 6 * MiB, MiB)
        s.ok("job-complete", {"id": "cm1"})
        s.wait_job("cm1", "null")
        exports = s.ok("query-block-exports")
        s.ok("nbd-server-stop")
        return {
            "events": events(s),
            "during": during,
            "jobs": jobs,
            "after": graph(s),
            "exports": exports,
        }

    both(tmp_path, _build, scenario)
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        assert header(d / "base.qcow2")["backing-filename"] is None
        assert header(d / "top.qcow2")["backing-filename"] == str(d / "mid.qcow2")
    assert compare(tmp_path / "blockd/base.qcow2", tmp_path / "qsd/base.qcow2", "qcow2", "qcow2")


def test_active_commit_cancel_after_ready(tmp_path: Path) -> None:
    """qsd-transcripts.md commit_active_cancel: base-node=mid, filter-node-name; cancel
    after READY completes without a pivot, the active layer stays."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        add_chain(s, d)
        s.ok(
            "block-commit",
            {"job-id": "cm2", "device": "top", "base-node": "mid", "filter-node-name": "cf"},
        )
        s.wait_job("cm2", "ready")
        during = graph(s)
        s.ok("block-job-cancel", {"device": "cm2"})
        s.wait_job("cm2", "null")
        return {"events": events(s), "during": during, "after": graph(s)}

    both(tmp_path, _build, scenario)
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        assert compare(d / "before.raw", d / "top.qcow2", "raw", "qcow2")
        # mid now holds top's data too
        assert compare(d / "before.raw", d / "mid.qcow2", "raw", "qcow2")


def test_commit_snapshot_chain_read_only_base(tmp_path: Path) -> None:
    """The document's chain built with blockdev-snapshot-sync (backing nodes read-only):
    the base is reopened read-write for the job; after an active commit completes it is the
    active layer; an intermediate commit hands it back read-only."""

    def build(d: Path) -> None:
        qcow2_image(d / "a.qcow2", 8 * MiB, [(0x0A, 0, 2 * MiB)])

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        s.ok("blockdev-add", qcow2_node("node-A", d / "a.qcow2"))
        sock = d / "nbd.sock"
        s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        s.ok(
            "block-export-add", {"type": "nbd", "id": "e0", "node-name": "node-A", "writable": True}
        )
        for prev, name in (("A", "B"), ("B", "C"), ("C", "D")):
            s.ok(
                "blockdev-snapshot-sync",
                {
                    "node-name": f"node-{prev}",
                    "snapshot-file": str(d / f"{name.lower()}.qcow2"),
                    "snapshot-node-name": f"node-{name}",
                    "format": "qcow2",
                },
            )
            nbd_write(sock, "node-A", 0x10 + ord(name), ord(name) % 4 * MiB, MiB)
        s.ok(
            "block-commit",
            {
                "job-id": "job0",
                "device": "node-D",
                "top": str(d / "b.qcow2"),
                "base": str(d / "a.qcow2"),
            },
        )
        s.wait_job("job0", "null")
        mid = chain_of(s, "node-D")
        s.ok("block-commit", {"job-id": "job1", "device": "node-D", "base": str(d / "a.qcow2")})
        s.wait_job("job1", "ready")
        during = [chain_of(s, "node-A"), [r for r in graph(s) if r[1] == "mirror_top"]]
        s.ok("block-job-complete", {"device": "job1"})
        s.wait_job("job1", "null")
        exports = s.ok("query-block-exports")
        out = {"events": events(s), "mid": mid, "during": during, "exports": exports}
        out["after"] = chain_of(s, exports[0]["node-name"])
        s.ok("nbd-server-stop")
        return out

    both(tmp_path, build, scenario)
    assert compare(tmp_path / "blockd/a.qcow2", tmp_path / "qsd/a.qcow2", "qcow2", "qcow2")


def test_commit_refusals_busy_and_cancel(tmp_path: Path) -> None:
    """qsd-transcripts.md commit_stream_errors (the commit part) and more: wrong nodes,
    exclusive arguments, a busy chain, a throttled commit cancelled."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        add_chain(s, d)
        replies = [
            s.cmd("block-commit", {"job-id": "e1", "device": "base"}),
            s.cmd(
                "block-commit",
                {"job-id": "e2", "device": "top", "top-node": "base", "base-node": "mid"},
            ),
            s.cmd(
                "block-commit", {"job-id": "e3", "device": "top", "base": "x", "base-node": "base"}
            ),
            s.cmd("block-commit", {"job-id": "e4", "device": "nonode"}),
            s.cmd("block-commit", {"job-id": "e5", "device": "top", "top": "x", "top-node": "mid"}),
            s.cmd(
                "block-commit",
                {"job-id": "e6", "device": "top", "top-node": "top", "base-node": "top"},
            ),
            s.cmd("block-commit", {"job-id": "e7", "device": "top", "top-node": "nonode"}),
            s.cmd("block-commit", {"job-id": "e7", "device": "top", "base-node": "nonode"}),
            s.cmd("block-commit", {"job-id": "e7", "device": "top", "top": "nofile.qcow2"}),
            s.cmd("block-commit", {"job-id": "e7", "device": "top", "base": "nofile.qcow2"}),
            s.cmd("block-commit", {"job-id": "e7", "device": "top", "backing-file": "x"}),
            s.cmd("block-commit", {"device": "top", "top-node": "mid"}),
            s.cmd("block-commit", {"job-id": "1bad", "device": "top", "top-node": "mid"}),
            s.cmd("block-commit", {"job-id": "e7", "device": "top", "speed": -1}),
            s.cmd(
                "block-commit",
                {"job-id": "e7", "device": "top", "top-node": "mid", "filter-node-name": "top"},
            ),
        ]
        s.ok(
            "block-commit",
            {"job-id": "e8", "device": "top", "top-node": "mid", "base-node": "base", "speed": 1},
        )
        busy = [
            s.cmd(
                "block-commit",
                {"job-id": "e8", "device": "top", "top-node": "mid", "base-node": "base"},
            ),
            s.cmd("blockdev-del", {"node-name": "top"}),
            s.cmd("blockdev-del", {"node-name": "mid"}),
            s.cmd("block-job-complete", {"device": "e8"}),
        ]
        # A throttled commit copies its first chunk, then waits: both daemons get there in
        # their own time (mid's data, so the first copy, starts at 2 MiB).
        settled_offset(s, "e8", at_least=2 * MiB + 512 * 1024)
        q = s.ok("query-block-jobs")
        s.ok("job-cancel", {"id": "e8"})
        s.wait_job("e8", "null")
        # the polling above took as many queries as each daemon needed
        evs = [e for e in events(s) if tuple(e) != ("->", "query-block-jobs")]
        return {"replies": replies, "busy": busy, "q": q, "events": evs, "after": graph(s)}

    res = both(tmp_path, _build, scenario)
    assert sum(1 for r in res["replies"] + res["busy"] if "error" in r) >= 16
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        assert compare(d / "before.raw", d / "top.qcow2", "raw", "qcow2")
