"""block_resize and change-backing-file against qemu-storage-daemon: what grows, what is
refused and with which text, bitmaps that follow the new size, headers qemu-img reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chainsupport import add_chain, build_chain, check_clean, graph, headers, same_on_both
from diffsupport import MiB, Session, norm, run_both
from support import qemu_img, qemu_io


def _build(d: Path) -> None:
    build_chain(d)
    qemu_img("create", "-f", "qcow2", d / "q.qcow2", "4M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x61 3M 1M", d / "q.qcow2")
    qemu_img("create", "-f", "raw", d / "r.raw", "1M")


def _sizes(s: Session) -> dict[str, Any]:
    out = {}
    for n in s.ok("query-named-block-nodes"):
        # File nodes under a format are left out: blockd grows a qcow2 file ahead of its
        # writes and trims it at close, QSD grows it write by write.
        if not n["node-name"].startswith("#") and n["drv"] != "file":
            bitmaps = [(b.get("name"), b["count"]) for b in n.get("dirty-bitmaps", [])]
            out[n["node-name"]] = [n["image"]["virtual-size"], bitmaps]
    return out


def test_block_resize(tmp_path: Path) -> None:
    def scenario(s: Session, d: Path) -> dict[str, Any]:
        add_chain(s, d)
        q_file = {"driver": "file", "filename": str(d / "q.qcow2"), "node-name": "q-file"}
        s.ok("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": q_file})
        r_file = {"driver": "file", "filename": str(d / "r.raw"), "node-name": "r-file"}
        s.ok("blockdev-add", {"driver": "raw", "node-name": "r", "file": r_file})
        s.ok("blockdev-add", {"driver": "null-co", "node-name": "nul"})
        s.ok("blockdev-add", {"driver": "raw", "node-name": "win", "size": 4096, "file": "r-file"})
        s.ok("block-dirty-bitmap-add", {"node": "q", "name": "p", "persistent": True})
        s.ok("block-dirty-bitmap-add", {"node": "q", "name": "m"})
        s.ok("block-dirty-bitmap-add", {"node": "r", "name": "m"})
        out: dict[str, Any] = {}
        cases: list[dict[str, Any]] = [
            {"size": MiB},
            {"node-name": "r"},
            {"device": "r", "size": MiB},
            {"node-name": "nonode", "size": MiB},
            {"node-name": "q", "size": -1},
            {"node-name": "mid", "size": 32 * MiB},
            {"node-name": "base", "device": "dev", "size": 32 * MiB},
            {"node-name": "q", "size": 8 * MiB + 1},
            {"node-name": "q", "size": 2**63 - 2**30 + 512},
            {"node-name": "q", "size": 2**62},
            {"node-name": "q-file", "size": 8 * MiB},
            {"node-name": "nul", "size": 8 * MiB},
            {"node-name": "win", "size": 8 * MiB},
            {"node-name": "q", "size": 8 * MiB},
            {"node-name": "top", "size": 24 * MiB},
            {"node-name": "r", "size": 3 * MiB},
            {"node-name": "r", "size": 512 * 1024},
            {"node-name": "q", "size": 2**34},
        ]
        for i, args in enumerate(cases):
            r = s.cmd("block_resize", args)
            out[f"{i} {args}"] = norm(r.get("error", r), d)
        out["sizes"] = _sizes(s)
        # The grown area is written like any other: bitmaps see it. Then a shrink drops
        # what lies past the new end, including whole L2 tables.
        s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(d / "n.sock")}}})
        s.ok("block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "writable": True})
        url = f"nbd+unix:///q?socket={d}/n.sock"
        qemu_io("-f", "raw", "-c", "write -P 0x62 40M 1M", "-c", "write -P 0x63 8G 2M", url)
        out["after write"] = _sizes(s)
        s.ok("block-export-del", {"id": "e"})
        out["shrink"] = s.cmd("block_resize", {"node-name": "q", "size": 64 * MiB})
        out["shrunk"] = _sizes(s)
        s.ok("block-stream", {"job-id": "j", "device": "top", "speed": 1})
        out["during stream"] = s.cmd("block_resize", {"node-name": "top", "size": 32 * MiB})
        s.ok("block-job-cancel", {"device": "j"})
        s.wait_job("j", "null")
        return out

    got = same_on_both(run_both(tmp_path, _build, scenario))
    assert got["sizes"]["q"] == [2**34, [("m", 0), ("p", 0)]]
    assert got["after write"]["q"][1] == [("m", 3 * MiB), ("p", 3 * MiB)]
    assert got["shrunk"]["q"] == [64 * MiB, [("m", MiB), ("p", MiB)]]
    for kind in ("blockd", "qsd"):
        d = tmp_path / kind
        check_clean(d, ("top", "q"))
        info = json.loads(qemu_img("info", "--output=json", d / "q.qcow2").stdout)
        assert info["virtual-size"] == 64 * MiB
        bitmaps = info["format-specific"]["data"]["bitmaps"]
        assert [b["name"] for b in bitmaps] == ["p"]
        qemu_io("-f", "qcow2", "-c", "read -P 0x61 3M 1M", "-c", "read -P 0 4M 36M", d / "q.qcow2")
        qemu_io("-f", "qcow2", "-c", "read -P 0x62 40M 1M", d / "q.qcow2")


def test_change_backing_file(tmp_path: Path) -> None:
    def scenario(s: Session, d: Path) -> dict[str, Any]:
        add_chain(s, d, read_only=("mid",))
        qemu_img("create", "-f", "qcow2", d / "o.qcow2", "16M")
        s.ok(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "o",
                "file": {"driver": "file", "filename": str(d / "o.qcow2")},
            },
        )
        out: dict[str, Any] = {}
        cases: list[dict[str, Any]] = [
            {"device": "nonode", "image-node-name": "top", "backing-file": "x"},
            {"device": "mid", "image-node-name": "mid", "backing-file": "x"},
            {"device": "top", "image-node-name": "nonode", "backing-file": "x"},
            {"device": "top", "image-node-name": "base", "backing-file": "x"},
            {"device": "o", "image-node-name": "mid", "backing-file": "x"},
            {"device": "top", "image-node-name": "top", "backing-file": "y" * 1100},
            {"device": "top", "image-node-name": "top", "backing-file": "x.qcow2"},
            {"device": "top", "image-node-name": "mid", "backing-file": "base.qcow2"},
        ]
        for i, args in enumerate(cases):
            r = s.cmd("change-backing-file", args)
            out[f"{i} {args}"] = norm(r.get("error", r), d)
        out["headers"] = headers(d)
        out["graph"] = graph(s, d)
        s.ok("block-stream", {"job-id": "j", "device": "top", "speed": 1})
        out["during stream"] = s.cmd(
            "change-backing-file", {"device": "top", "image-node-name": "mid", "backing-file": ""}
        )
        s.ok("block-job-cancel", {"device": "j"})
        s.wait_job("j", "null")
        s.ok("change-backing-file", {"device": "top", "image-node-name": "mid", "backing-file": ""})
        out["cleared"] = headers(d)
        return out

    got = same_on_both(run_both(tmp_path, build_chain, scenario))
    assert got["headers"]["top"] == ["x.qcow2", "qcow2"]
    assert got["cleared"]["mid"] == [None, None]
    assert ["mid", "qcow2", True, "$DIR/base.qcow2", 1] in got["graph"]
