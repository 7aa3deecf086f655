"""block-stream against qemu-storage-daemon: each scenario runs on both daemons over the same
images, and the event sequence (names, statuses, order, data, which came before the reply),
the graph during and after the job (copy-on-read filter included), the image headers and the
data must agree. Absolute checks on top make sure both are right, not only equal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chainsupport import (
    FIRST_STOP,
    SIZE,
    add_chain,
    allocation,
    build_chain,
    check_clean,
    graph,
    headers,
    job_events,
    markers,
    node_entry,
    raw_copy,
    same_on_both,
    settled_offset,
)
from diffsupport import Session, norm, qcow2_node, run_both
from support import qemu_img


def _chain_data(d: Path, top: str = "top") -> bytes:
    return raw_copy(d / f"{top}.qcow2", d / f"{top}-chain.raw")


def _reference(tmp: Path) -> dict[str, bytes]:
    """What each chain reads before any job: the data no stream may change."""
    d = tmp / "reference"
    d.mkdir()
    build_chain(d)
    return {"top": _chain_data(d), "mid": _chain_data(d, "mid")}


def _images(tmp: Path, ref: dict[str, bytes], alloc: str = "top") -> dict[str, Any]:
    """After both daemons stopped (QSD keeps metadata in its caches until then): the headers,
    *alloc*'s own allocation, each chain's data against the reference, qemu-img check."""
    out = {}
    for kind in ("blockd", "qsd"):
        d = tmp / kind
        check_clean(d)
        for name, data in ref.items():
            assert _chain_data(d, name) == data, f"{kind}: {name} reads different data"
        out[kind] = {"headers": headers(d), "alloc": allocation(d / f"{alloc}.qcow2")}
    assert out["blockd"] == out["qsd"], out
    return out["qsd"]


def test_stream_to_base_node_then_whole_chain(tmp_path: Path) -> None:
    """The transcript's two streams (base-node, then everything) on a chain with data in
    every layer, zeroed ranges and unaligned writes."""
    ref = _reference(tmp_path)

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        add_chain(s, d)
        # Copies are the data the guest already sees: they dirty no bitmap.
        s.ok("block-dirty-bitmap-add", {"node": "top", "name": "b"})
        out: dict[str, Any] = {}
        s.ok("block-stream", {"job-id": "st0", "device": "top", "base-node": "base"})
        s.wait_job("st0", "null")
        out["graph1"] = graph(s, d)
        out["bitmap"] = s.bitmap("top", "b")
        out["headers1"] = headers(d)
        s.ok("block-stream", {"job-id": "st1", "device": "top"})
        s.wait_job("st1", "null")
        out["graph2"] = graph(s, d)
        out["events"] = job_events(s)
        out["markers"] = markers(s)
        return out

    got = same_on_both(run_both(tmp_path, build_chain, scenario))
    assert got["headers1"]["top"] == ["$DIR/base.qcow2", "qcow2"]
    assert got["graph2"][0] == ["top", "qcow2", False, None, 0]
    assert got["bitmap"]["count"] == 0
    img = _images(tmp_path, ref)
    assert img["headers"]["top"] == [None, None]
    assert sum(run[1] for run in img["alloc"]) == SIZE  # every cluster is in top now


def test_intermediate_stream_into_read_only_node(tmp_path: Path) -> None:
    """device = mid (read-only, as a snapshot leaves it): reopened read-write for the job and
    read-only again after; top keeps mid as its backing, mid now backs onto nothing."""
    ref = _reference(tmp_path)

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        add_chain(s, d, read_only=("base", "mid"))
        s.ok("block-stream", {"job-id": "i0", "device": "mid"})
        s.wait_job("i0", "null")
        return {"graph": graph(s, d), "events": job_events(s)}

    got = same_on_both(run_both(tmp_path, build_chain, scenario))
    assert ["mid", "qcow2", True, None, 0] in got["graph"]
    img = _images(tmp_path, ref, alloc="mid")
    assert img["headers"]["mid"] == [None, None]


def test_graph_while_streaming_and_manual_finalize(tmp_path: Path) -> None:
    """A throttled stream with a named filter: the copy-on-read node as query-named-block-nodes
    shows it, query-block-jobs, set-speed, then manual finalize and dismiss."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        add_chain(s, d)
        s.ok(
            "block-stream",
            {
                "job-id": "t0",
                "device": "top",
                "base-node": "base",
                "speed": 1,
                "filter-node-name": "cor",
                "auto-finalize": False,
                "auto-dismiss": False,
            },
        )
        out: dict[str, Any] = {"offset": settled_offset(s, "t0", FIRST_STOP["above base"])}
        out["during"] = graph(s, d)
        out["cor"] = node_entry(s, d, "cor")
        out["jobs"] = norm(s.ok("query-block-jobs"), d)
        speed = {"device": "t0", "speed": -1}
        out["bad speed"] = s.cmd("block-job-set-speed", speed).get("error")
        out["no job"] = s.cmd("block-job-set-speed", {**speed, "device": "t9"}).get("error")
        s.ok("block-job-set-speed", {"device": "t0", "speed": 0})
        s.wait(lambda e: e["event"] == "BLOCK_JOB_PENDING")
        out["late speed"] = s.cmd("block-job-set-speed", {**speed, "speed": 5}).get("error")
        out["pending"] = graph(s, d)
        s.ok("job-finalize", {"id": "t0"})
        s.ok("job-dismiss", {"id": "t0"})
        out["after"] = graph(s, d)
        out["events"] = job_events(s)
        out["markers"] = markers(s)
        return out

    got = same_on_both(run_both(tmp_path, build_chain, scenario))
    assert got["during"][0][:2] == ["cor", "copy-on-read"]
    assert got["offset"] < SIZE


def test_bottom_base_filename_and_backing_file(tmp_path: Path) -> None:
    """A cancelled stream, then ``bottom``, ``base`` given as a file name, and ``backing-file``
    written to the header as given while the graph shows the base node's own name."""
    ref = _reference(tmp_path)

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        add_chain(s, d)
        # A cancelled stream changes nothing that anyone can see.
        s.ok("block-stream", {"job-id": "c0", "device": "top", "speed": 1})
        settled_offset(s, "c0", FIRST_STOP["whole"])
        s.ok("block-job-cancel", {"device": "c0"})
        s.wait_job("c0", "null")
        out: dict[str, Any] = {"cancelled": headers(d), "graph c": graph(s, d)}
        s.ok("block-stream", {"job-id": "b0", "device": "top", "bottom": "top"})
        s.wait_job("b0", "null")
        out["headers0"] = headers(d)
        out["graph0"] = graph(s, d)
        s.ok(
            "block-stream",
            {"job-id": "b1", "device": "top", "base": "base.qcow2", "backing-file": "base.qcow2"},
        )
        s.wait_job("b1", "null")
        out["graph1"] = graph(s, d)
        out["events"] = job_events(s)
        return out

    got = same_on_both(run_both(tmp_path, build_chain, scenario))
    assert got["cancelled"]["top"] == ["$DIR/mid.qcow2", "qcow2"]
    assert got["graph c"][0] == ["top", "qcow2", False, "$DIR/mid.qcow2", 2]
    assert got["graph1"][0] == ["top", "qcow2", False, "$DIR/base.qcow2", 1]
    img = _images(tmp_path, ref)
    assert img["headers"]["top"] == ["base.qcow2", "qcow2"]


#: Wrong arguments, each with a fresh job id; none of them may change anything.
ERRORS: list[dict[str, Any]] = [
    {"device": "nonode"},
    {"device": "top", "base-node": "nonode"},
    {"device": "top", "base": "x", "base-node": "base"},
    {"device": "top", "bottom": "mid", "base-node": "base"},
    {"device": "top", "bottom": "mid", "base": "base.qcow2"},
    {"device": "top", "base-node": "top"},
    {"device": "mid", "base-node": "top"},
    {"device": "top", "base-node": "top-file"},
    {"device": "top", "backing-file": "x"},
    {"device": "top", "bottom": "mid", "backing-file": "x"},
    {"device": "top", "base": "nofile.qcow2"},
    {"device": "top", "bottom": "nonode"},
    {"device": "mid", "bottom": "top"},
    {"device": "top", "bottom": "base-file"},
    {"device": "top", "filter-node-name": "base"},
    {"device": "top", "filter-node-name": "1bad"},
    {"device": "top", "filter-node-name": "x" * 40},
    {"device": "top", "on-error": "bogus"},
    {"device": "top", "speed": "fast"},
    {"device": "top", "job-id": ""},
    {"device": "top", "job-id": "1x"},
    {"device": "top", "unknown": 1},
    {"device": "top", "speed": -1},
]


def test_wrong_arguments_and_busy_nodes(tmp_path: Path) -> None:
    def scenario(s: Session, d: Path) -> dict[str, Any]:
        add_chain(s, d)
        before = graph(s, d)
        # Nothing to stream into a node without backing: the job ends before the reply.
        s.ok("block-stream", {"job-id": "n0", "device": "base"})
        out: dict[str, Any] = {"nothing": markers(s)}
        for i, args in enumerate(ERRORS):
            r = s.cmd("block-stream", {"job-id": f"e{i}", **args})
            out[f"{i} {args}"] = norm(r.get("error", r), d)
        out["no-job-id"] = s.cmd("block-stream", {"device": "top"}).get("error")
        assert graph(s, d) == before
        # A writer on an image the job would copy from: refused once the job exists.
        s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(d / "n.sock")}}})
        s.ok("block-export-add", {"type": "nbd", "id": "x", "node-name": "mid", "writable": True})
        out["writer on mid"] = s.cmd("block-stream", {"job-id": "w", "device": "top"}).get("error")
        s.ok("block-export-del", {"id": "x"})
        s.ok("nbd-server-stop")
        assert graph(s, d) == before
        # A running stream makes its nodes busy for other streams and for blockdev-del.
        s.ok("block-stream", {"job-id": "run", "device": "top", "base-node": "base", "speed": 1})
        settled_offset(s, "run", FIRST_STOP["above base"])
        for args in ({"device": "top"}, {"device": "mid"}, {"device": "top", "job-id": "run"}):
            r = s.cmd("block-stream", {"job-id": "again", **args})
            out[f"busy {args}"] = r.get("error", r)
        for node in ("top", "mid", "base"):
            out[f"del {node}"] = s.cmd("blockdev-del", {"node-name": node}).get("error")
        s.ok("block-job-cancel", {"device": "run"})
        s.wait_job("run", "null")
        out["events"] = job_events(s)
        out["after"] = graph(s, d)
        return out

    got = same_on_both(run_both(tmp_path, build_chain, scenario))
    assert sum(1 for k, v in got.items() if k[0].isdigit() and "class" in v) >= 20
    assert got["writer on mid"]["desc"].startswith("Permission conflict on node 'mid'")
    assert got["nothing"][-2:] == ["J:n0:null", "<-True"]


def _failing_mid(d: Path, once: bool) -> dict[str, Any]:
    """mid behind blkdebug: reads of one of its data clusters fail with EIO (the first one
    only, with *once*); its metadata reads do not."""
    res = qemu_img("map", "-U", "--output=json", d / "mid.qcow2")
    host = next(e["offset"] for e in json.loads(res.stdout) if e["depth"] == 0 and e["data"])
    rule = {"event": "read_aio", "errno": 5, "once": once, "sector": host // 512 + 8}
    return {
        "driver": "qcow2",
        "node-name": "mid",
        "backing": "base",
        "file": {
            "driver": "blkdebug",
            "node-name": "mid-dbg",
            "inject-error": [rule],
            "image": {"driver": "file", "filename": str(d / "mid.qcow2"), "node-name": "mid-file"},
        },
    }


def test_error_policies(tmp_path: Path) -> None:
    """on-error report, ignore and stop (with resume) when reading an intermediate image
    fails: BLOCK_JOB_ERROR, the job's end, and whether the backing changed."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        s.ok("blockdev-add", qcow2_node("base", d / "base.qcow2"))
        for policy, once in (("report", False), ("ignore", False), ("stop", True)):
            s.ok("blockdev-add", _failing_mid(d, once))
            top = qcow2_node("top", d / "top.qcow2")
            s.ok("blockdev-add", {**top, "backing": "mid"})
            s.ok("block-stream", {"job-id": policy, "device": "top", "on-error": policy})
            if policy == "stop":
                s.wait(lambda e: e["event"] == "BLOCK_JOB_ERROR")
                s.wait_job(policy, "paused")
                out["stopped"] = [
                    {k: j[k] for k in ("io-status", "paused", "status")}
                    for j in s.ok("query-block-jobs")
                ]
                s.ok("block-job-resume", {"device": policy})
            s.wait_job(policy, "null")
            # How deep each chain is (names of blkdebug nodes differ between the two).
            out[f"depth {policy}"] = {n[0]: n[4] for n in graph(s, d) if n[0][0] != "#"}
            s.ok("blockdev-del", {"node-name": "top"})
            s.ok("blockdev-del", {"node-name": "mid"})
        out["events"] = job_events(s)
        for e in out["events"]:
            # Where a failed job stopped: QSD copies one chunk at a time, blockd several, so
            # blockd has done more of the disk when the failure ends the job.
            if e["event"] == "BLOCK_JOB_COMPLETED" and e["data"]["offset"] < e["data"]["len"]:
                e["data"]["offset"] = "part"
        return out

    got = same_on_both(run_both(tmp_path, build_chain, scenario))
    assert got["depth report"]["top"] == 2 and got["depth ignore"]["top"] == 2
    assert got["depth stop"]["top"] == 0
    actions = [e["data"]["action"] for e in got["events"] if e["event"] == "BLOCK_JOB_ERROR"]
    assert actions[-1] == "stop"
