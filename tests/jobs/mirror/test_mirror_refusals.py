"""Wrong arguments to blockdev-mirror and drive-mirror get qemu-storage-daemon's error class
and text, in QEMU's order of checks, and leave the graph (and the images) as they were."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from diffsupport import MiB, Session, qcow2_image, qcow2_node
from jobdiff import both, graph

pytestmark = [pytest.mark.qsd]


def _build(d: Path) -> None:
    qcow2_image(d / "base.qcow2", 16 * MiB, [(0x01, 0, MiB)])
    qcow2_image(d / "src.qcow2", 16 * MiB, [(0x02, MiB, MiB)], backing=d / "base.qcow2")
    qcow2_image(d / "tgt.qcow2", 16 * MiB)
    qcow2_image(d / "tgt2.qcow2", 16 * MiB)


def test_mirror_refusals(tmp_path: Path) -> None:
    def scenario(s: Session, d: Path) -> dict[str, Any]:
        s.ok("blockdev-add", qcow2_node("src", d / "src.qcow2"))
        s.ok("blockdev-add", qcow2_node("tgt", d / "tgt.qcow2"))
        s.ok("blockdev-add", qcow2_node("tgt2", d / "tgt2.qcow2"))
        base = next(
            n["node-name"]
            for n in s.ok("query-named-block-nodes")
            if n["drv"] == "qcow2" and n["node-name"].startswith("#")
        )
        bm = {"job-id": "m", "device": "src", "target": "tgt", "sync": "full"}
        dm = {"job-id": "m", "device": "src", "target": str(d / "new.qcow2"), "sync": "full"}
        before = graph(s)
        cases = [
            ("blockdev-mirror", {**bm, "device": "nonode"}),
            ("blockdev-mirror", {**bm, "target": "nonode"}),
            ("blockdev-mirror", {**bm, "target": "src"}),
            ("blockdev-mirror", {**bm, "device": base}),
            ("blockdev-mirror", {**bm, "target": base}),
            ("blockdev-mirror", {**bm, "granularity": 1000}),
            ("blockdev-mirror", {**bm, "granularity": 256}),
            ("blockdev-mirror", {**bm, "granularity": 128 * MiB}),
            ("blockdev-mirror", {**bm, "sync": "incremental"}),
            ("blockdev-mirror", {**bm, "sync": "bitmap"}),
            ("blockdev-mirror", {**bm, "replaces": "nonexist"}),
            ("blockdev-mirror", {**bm, "replaces": "tgt2"}),
            ("blockdev-mirror", {**bm, "buf-size": -1}),
            ("blockdev-mirror", {**bm, "speed": -1}),
            ("blockdev-mirror", {**bm, "job-id": "9x"}),
            ("blockdev-mirror", {**bm, "job-id": None}),
            ("blockdev-mirror", {**bm, "filter-node-name": "tgt2"}),
            ("blockdev-mirror", {**bm, "filter-node-name": "bad name"}),
            ("blockdev-mirror", {**bm, "sync": "fast"}),
            ("blockdev-mirror", {**bm, "copy-mode": "sometimes"}),
            ("drive-mirror", {**dm, "mode": "existing", "target": str(d / "missing.qcow2")}),
            ("drive-mirror", {**dm, "format": "nosuchfmt"}),
            ("drive-mirror", {**dm, "replaces": "src"}),
            ("drive-mirror", {**dm, "device": base}),
            ("drive-mirror", {**dm, "granularity": 1000}),
            ("drive-mirror", {**dm, "target": str(d / "nodir" / "x.qcow2")}),
        ]
        replies = []
        for cmd, args in cases:
            args = {k: v for k, v in args.items() if v is not None}
            replies.append((cmd, s.cmd(cmd, args).get("error")))
        # a job owns its nodes
        s.ok("blockdev-mirror", {**bm, "job-id": "slow", "speed": 1})
        busy = [
            s.cmd("blockdev-mirror", {**bm, "job-id": "slow", "target": "tgt2"}),
            s.cmd("blockdev-mirror", {**bm, "job-id": "x2", "device": "tgt2", "target": "tgt"}),
            s.cmd("blockdev-del", {"node-name": "tgt"}),
            s.cmd("blockdev-del", {"node-name": "src"}),
            s.cmd("block-job-complete", {"device": "slow"}),
        ]
        s.ok("job-cancel", {"id": "slow"})
        s.wait_job("slow", "null")
        return {"replies": replies, "busy": busy, "same": graph(s) == before}

    res = both(tmp_path, _build, scenario)
    assert res["same"]
    assert sum(1 for _, err in res["replies"] if err) >= 24
