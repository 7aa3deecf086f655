"""blockdev-mirror and drive-mirror, side by side with qemu-storage-daemon 7.2: the same
session on identical images must give the same events (names, statuses, order, len/offset),
the same graph during and after the job (mirror_top, which node backs which, the job's bitmap
on the source), the same image headers and the same contents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from diffsupport import MiB, Session, compare, nbd_write, qcow2_image, qcow2_node
from jobdiff import backing_chain, both, events, graph, header
from support import qemu_img

pytestmark = [pytest.mark.qsd]

DATA = [(0x11, 0, MiB), (0x22, 4 * MiB, 512 * 1024), (0x33, 9 * MiB + 4096, 70000)]


def _src_tgt(d: Path) -> None:
    qcow2_image(d / "src.qcow2", 16 * MiB, DATA)
    qcow2_image(d / "tgt.qcow2", 16 * MiB)


def _add_src_tgt(s: Session, d: Path) -> None:
    s.ok("blockdev-add", qcow2_node("src", d / "src.qcow2"))
    s.ok("blockdev-add", qcow2_node("tgt", d / "tgt.qcow2"))


def test_complete_pivots_export_and_target_equals_source(tmp_path: Path) -> None:
    """READY once in sync, complete moves the export onto the target; the target holds
    what the source held plus what was written over NBD before completion."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        _add_src_tgt(s, d)
        sock = d / "nbd.sock"
        s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "writable": True})
        s.ok("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "tgt", "sync": "full"})
        s.wait_job("m0", "ready")
        during = graph(s)
        jobs = s.ok("query-block-jobs")
        nbd_write(sock, "src", 0x44, 3 * MiB, 2 * MiB)
        s.ok("block-job-complete", {"device": "m0"})
        s.wait_job("m0", "null")
        exports = s.ok("query-block-exports")
        nbd_write(sock, "src", 0x55, 8 * MiB, MiB)  # now lands in tgt
        after = graph(s)
        s.ok("nbd-server-stop")
        s.ok("blockdev-del", {"node-name": "src"})
        s.ok("blockdev-del", {"node-name": "tgt"})
        return {
            "events": events(s),
            "during": during,
            "after": after,
            "jobs": jobs,
            "exports": exports,
        }

    both(tmp_path, _src_tgt, scenario)
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        src_data = qemu_img("map", "--output=json", d / "tgt.qcow2").stdout
        assert '"data": true' in src_data
    # both daemons left the same bytes in both images
    for name in ("src.qcow2", "tgt.qcow2"):
        assert compare(tmp_path / "blockd" / name, tmp_path / "qsd" / name, "qcow2", "qcow2")


@pytest.mark.parametrize("verb", ["block-job-cancel", "job-cancel"])
def test_cancel_after_ready(tmp_path: Path, verb: str) -> None:
    """Soft cancel after READY ends with BLOCK_JOB_COMPLETED and a point-in-time copy;
    job-cancel (force) ends with BLOCK_JOB_CANCELLED."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        _add_src_tgt(s, d)
        s.ok("blockdev-mirror", {"job-id": "m1", "device": "src", "target": "tgt", "sync": "full"})
        s.wait_job("m1", "ready")
        key = "device" if verb == "block-job-cancel" else "id"
        s.ok(verb, {key: "m1"})
        s.wait_job("m1", "null")
        out = {"events": events(s), "after": graph(s)}
        s.ok("blockdev-del", {"node-name": "tgt"})
        return out

    both(tmp_path, _src_tgt, scenario)
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        assert compare(d / "src.qcow2", d / "tgt.qcow2", "qcow2", "qcow2")


def test_pause_in_ready_complete_then_resume(tmp_path: Path) -> None:
    """qsd-transcripts.md mirror_forcecancel_after_ready: standby, job-complete accepted
    while paused, resume completes; cancel of a concluded job refused; manual dismiss."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        _add_src_tgt(s, d)
        s.ok(
            "blockdev-mirror",
            {
                "job-id": "m3",
                "device": "src",
                "target": "tgt",
                "sync": "full",
                "auto-dismiss": False,
            },
        )
        s.wait_job("m3", "ready")
        s.ok("job-pause", {"id": "m3"})
        paused = s.ok("query-block-jobs")
        s.ok("job-complete", {"id": "m3"})
        s.ok("job-resume", {"id": "m3"})
        s.wait_job("m3", "concluded")
        refused = s.cmd("block-job-cancel", {"device": "m3", "force": True})
        concluded = s.ok("query-jobs")
        s.ok("job-dismiss", {"id": "m3"})
        return {"events": events(s), "paused": paused, "refused": refused, "q": concluded}

    both(tmp_path, _src_tgt, scenario)


def test_cancel_before_ready(tmp_path: Path) -> None:
    """Throttled: complete refused while running; cancel gives BLOCK_JOB_CANCELLED."""

    def build(d: Path) -> None:
        qcow2_image(d / "src.qcow2", 16 * MiB, [(0x61, 0, 12 * MiB)])
        qcow2_image(d / "tgt.qcow2", 16 * MiB)

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        _add_src_tgt(s, d)
        s.ok(
            "blockdev-mirror",
            {"job-id": "m4", "device": "src", "target": "tgt", "sync": "full", "speed": MiB},
        )
        refused = s.cmd("block-job-complete", {"device": "m4"})
        q = s.ok("query-block-jobs")[0]
        s.ok("block-job-cancel", {"device": "m4"})
        s.wait_job("m4", "null")
        return {
            "events": events(s, skip_offset_of=["m4"]),
            "refused": refused,
            "q": {k: q[k] for k in ("status", "ready", "speed", "len")},
            "after": graph(s),
        }

    both(tmp_path, build, scenario)


def test_drive_mirror_full_new_image(tmp_path: Path) -> None:
    """drive-mirror into a file it creates: len is the allocated data only, the target node
    carries node-name during the job and is freed after a complete that moved no parent."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        s.ok("blockdev-add", qcow2_node("src", d / "src.qcow2"))
        s.ok(
            "drive-mirror",
            {
                "job-id": "dm1",
                "device": "src",
                "target": str(d / "dm1.qcow2"),
                "sync": "full",
                "format": "qcow2",
                "node-name": "dm1-node",
            },
        )
        s.wait_job("dm1", "ready")
        during = graph(s)
        s.ok("block-job-complete", {"device": "dm1"})
        s.wait_job("dm1", "null")
        return {"events": events(s), "during": during, "after": graph(s)}

    both(tmp_path, _src_tgt, scenario)
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        assert compare(d / "src.qcow2", d / "dm1.qcow2", "qcow2", "qcow2")
        assert header(d / "dm1.qcow2")["backing-filename"] is None


@pytest.mark.parametrize("mode", ["absolute-paths", "existing"])
def test_drive_mirror_top_keeps_backing(tmp_path: Path, mode: str) -> None:
    """sync=top: only the top layer is copied; the target is open without a backing file
    during the job and gets the source's backing at completion, the export following."""

    def build(d: Path) -> None:
        qcow2_image(d / "base.qcow2", 16 * MiB, [(0x0B, 0, 6 * MiB)])
        qcow2_image(d / "src.qcow2", 16 * MiB, DATA, backing=d / "base.qcow2")
        if mode == "existing":
            qcow2_image(d / "new.qcow2", 16 * MiB, backing=d / "base.qcow2")

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        s.ok("blockdev-add", qcow2_node("src", d / "src.qcow2"))
        sock = d / "nbd.sock"
        s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "writable": True})
        args = {"job-id": "dm2", "device": "src", "target": str(d / "new.qcow2"), "sync": "top"}
        args["mode"] = mode
        if mode == "existing":
            args["format"] = "qcow2"
        s.ok("drive-mirror", args)
        s.wait_job("dm2", "ready")
        during = graph(s)
        new_header = header(d / "new.qcow2")
        s.ok("block-job-complete", {"device": "dm2"})
        s.wait_job("dm2", "null")
        out = {
            "events": events(s),
            "during": during,
            "after": graph(s),
            "header": new_header,
            "exports": s.ok("query-block-exports"),
        }
        s.ok("nbd-server-stop")
        return out

    both(tmp_path, build, scenario)
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        assert backing_chain(d / "new.qcow2") == [
            ("new.qcow2", str(d / "base.qcow2")),
            ("base.qcow2", None),
        ]
        assert compare(d / "src.qcow2", d / "new.qcow2", "qcow2", "qcow2")


def test_sync_none_write_blocking_filter_name(tmp_path: Path) -> None:
    """sync=none, copy-mode=write-blocking and filter-node-name: READY at once with len 0;
    writes made while the job is paused still reach the target; the filter is named."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        _add_src_tgt(s, d)
        sock = d / "nbd.sock"
        s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        s.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "writable": True})
        s.ok(
            "blockdev-mirror",
            {
                "job-id": "bm1",
                "device": "src",
                "target": "tgt",
                "sync": "none",
                "copy-mode": "write-blocking",
                "granularity": 65536,
                "buf-size": MiB,
                "filter-node-name": "mf",
            },
        )
        s.wait_job("bm1", "ready")
        during = graph(s)
        s.ok("job-pause", {"id": "bm1"})
        nbd_write(sock, "src", 0x77, 2 * MiB, 128 * 1024)
        nbd_write(sock, "src", 0x78, 5 * MiB + 512, 1000)
        refused = s.cmd("block-job-cancel", {"device": "bm1"})
        s.ok("job-resume", {"id": "bm1"})
        s.ok("block-job-cancel", {"device": "bm1"})
        s.wait_job("bm1", "null")
        s.ok("nbd-server-stop")
        out = {"events": events(s, markers=False), "during": during, "after": graph(s)}
        return {**out, "refused": refused}

    both(tmp_path, _src_tgt, scenario)
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        out = qemu_img(
            "compare", "-f", "qcow2", "-F", "qcow2", d / "tgt.qcow2", d / "src.qcow2", check=False
        )
        # the target has the writes (and nothing else of the source)
        assert "Content mismatch at offset 0!" in out.stdout, out.stdout
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        img = qemu_img("map", "--output=json", d / "tgt.qcow2").stdout
        assert img.count('"data": true') >= 2


def test_different_size_and_replaces(tmp_path: Path) -> None:
    """A smaller target is accepted and the job fails; replaces names a node that is not
    the source; a target used as a backing file."""

    def build(d: Path) -> None:
        _src_tgt(d)
        qcow2_image(d / "small.qcow2", 8 * MiB)
        qcow2_image(d / "ov.qcow2", 16 * MiB, backing=d / "tgt.qcow2")

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        _add_src_tgt(s, d)
        s.ok("blockdev-add", qcow2_node("small", d / "small.qcow2"))
        s.ok(
            "blockdev-mirror", {"job-id": "m5", "device": "src", "target": "small", "sync": "full"}
        )
        s.wait_job("m5", "null")
        replies = [
            s.cmd(
                "blockdev-mirror",
                {
                    "job-id": "m6",
                    "device": "src",
                    "target": "tgt",
                    "sync": "full",
                    "replaces": "small",
                },
            ),
            s.cmd(
                "blockdev-mirror",
                {
                    "job-id": "m6",
                    "device": "src",
                    "target": "tgt",
                    "sync": "full",
                    "replaces": "src",
                    "speed": -1,
                },
            ),
        ]
        return {"events": events(s), "replies": replies, "after": graph(s)}

    both(tmp_path, build, scenario)


def test_manual_finalize_and_dismiss(tmp_path: Path) -> None:
    """auto-finalize and auto-dismiss off: complete leads to pending (BLOCK_JOB_PENDING), the
    pivot happens at job-finalize, the job stays concluded until job-dismiss."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        _add_src_tgt(s, d)
        s.ok(
            "blockdev-mirror",
            {
                "job-id": "m7",
                "device": "src",
                "target": "tgt",
                "sync": "top",
                "auto-finalize": False,
                "auto-dismiss": False,
                "filter-node-name": "mt",
            },
        )
        s.wait_job("m7", "ready")
        s.ok("block-job-complete", {"device": "m7"})
        s.wait_job("m7", "pending")
        pending = (s.ok("query-jobs"), graph(s))
        s.ok("job-finalize", {"id": "m7"})
        s.wait_job("m7", "concluded")
        concluded = s.ok("query-block-jobs")
        s.ok("job-dismiss", {"id": "m7"})
        return {"events": events(s), "pending": pending, "concluded": concluded, "after": graph(s)}

    both(tmp_path, _src_tgt, scenario)
