"""blockdev-reopen against qemu-storage-daemon: read-only toggles, backing changes, the list
as one transaction, and QEMU's refusals, on both daemons over the same chain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chainsupport import add_chain, build_chain, graph, same_on_both
from diffsupport import Session, norm, run_both


def _q(d: Path, name: str, **extra: Any) -> dict[str, Any]:
    """qcow2 options for a chain node as add_chain opened it (named file node)."""
    file = {"driver": "file", "filename": str(d / f"{name}.qcow2"), "node-name": f"{name}-file"}
    return {"driver": "qcow2", "node-name": name, "file": file, **extra}


def _reopen(s: Session, d: Path, *entries: dict[str, Any]) -> Any:
    r = s.cmd("blockdev-reopen", {"options": list(entries)})
    return norm(r.get("error", r), d)


def test_reopen_changes_and_refusals(tmp_path: Path) -> None:
    def scenario(s: Session, d: Path) -> dict[str, Any]:
        add_chain(s, d)
        out: dict[str, Any] = {}

        def step(label: str, *entries: dict[str, Any]) -> None:
            out[label] = _reopen(s, d, *entries)
            out[label + " graph"] = graph(s, d)

        top_file = {"driver": "file", "filename": str(d / "top.qcow2")}
        # Refusals, each leaving the graph as it was.
        step("no node-name", {"driver": "qcow2", "file": top_file, "backing": "mid"})
        step("unknown node", _q(d, "nonode"))
        step("backing missing", _q(d, "top"))
        step("driver", {"driver": "raw", "node-name": "top", "file": "top-file"})
        step("filename", _q(d, "top", backing="mid", file={**top_file, "filename": "/x"}))
        step("child node-name", _q(d, "top", backing="mid", file={**top_file, "node-name": "zz"}))
        step("force-share", _q(d, "top", backing="mid", **{"force-share": True}))
        step("data-file", _q(d, "top", backing="mid", **{"data-file": "base"}))
        step("detect-zeroes", _q(d, "top", backing="mid", **{"detect-zeroes": "unmap"}))
        step("unknown backing", _q(d, "top", backing="nonode"))
        step("self backing", _q(d, "top", backing="top"))
        step("cycle in list", _q(d, "top", backing="mid"), _q(d, "mid", backing="top"))
        step("backing options", _q(d, "top", backing=_q(d, "mid", backing="base")))
        step("aio", _q(d, "top", backing="mid", file={**top_file, "aio": "native"}))
        step("child ro", _q(d, "top", backing="mid", file={**top_file, "read-only": True}))
        # Changes.
        step(
            "file by name",
            {"driver": "qcow2", "node-name": "top", "file": "top-file", "backing": "mid"},
        )
        step("top ro", _q(d, "top", backing="mid", **{"read-only": True}))
        step("top rw", _q(d, "top", backing="mid"))
        step("backing base", _q(d, "top", backing="base"))
        step("backing none", _q(d, "top", backing=None))
        step("backing mid", _q(d, "top", backing="mid"))
        step("two entries", _q(d, "mid", backing="base", **{"read-only": True}), _q(d, "base"))
        step(
            "mid rw, flags",
            _q(d, "mid", backing="base", discard="unmap", **{"detect-zeroes": "unmap"}),
        )
        # A writer on top: the whole list fails, mid stays read-write.
        s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(d / "n.sock")}}})
        s.ok("block-export-add", {"type": "nbd", "id": "e", "node-name": "top", "writable": True})
        ro = {"read-only": True}
        step("writer", _q(d, "mid", backing="base", **ro), _q(d, "top", backing="mid", **ro))
        s.ok("block-export-del", {"id": "e"})
        s.ok("nbd-server-stop")
        # A stream holds top's backing link frozen; mid may still change.
        s.ok("block-stream", {"job-id": "j", "device": "top", "base-node": "base", "speed": 1})
        step("frozen base", _q(d, "top", backing="base"))
        step("frozen none", _q(d, "top", backing=None))
        step("streamed ro", _q(d, "top", backing="mid", **ro))
        step("intermediate ro", _q(d, "mid", backing="base", **ro))
        s.ok("block-job-cancel", {"device": "j"})
        s.wait_job("j", "null")
        out["end"] = graph(s, d)
        return out

    got = same_on_both(run_both(tmp_path, build_chain, scenario))
    assert got["frozen base"]["desc"] == "Cannot change frozen 'backing' link from 'top' to 'mid'"
    assert got["backing none graph"][0] == ["top", "qcow2", False, None, 0]
    assert ["mid", "qcow2", False, "$DIR/base.qcow2", 1] in got["writer graph"]
    assert sum(1 for k, v in got.items() if not k.endswith("graph") and "desc" in v) >= 18
