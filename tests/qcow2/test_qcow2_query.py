"""query-named-block-nodes on qcow2 nodes answers what qemu-storage-daemon answers, member for
member: image info down the backing chain, format-specific data (v2 and v3, bitmaps from the
image), backing_file, depth, dirty bitmaps. Only ``actual-size`` (host allocation) may differ."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffsupport import Session, start
from support import qemu_img, qemu_io


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k != "actual-size"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def test_qcow2_node_info_matches_qsd(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", base, "8M")
    qemu_io("-c", "write -P 1 0 1M", base)
    qemu_img(
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,refcount_bits=64",
        "-b",
        base.name,
        "-F",
        "qcow2",
        mid,
        "8M",
    )
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=2M", "-b", mid, "-F", "qcow2", top, "16M")
    qemu_img("bitmap", "--add", "-g", "1M", top, "pb")
    seen: dict[str, Any] = {}
    for kind in ("qsd", "blockd"):
        d = start(kind, tmp_path)
        s = Session(d.sock)
        s.ok(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "top",
                "file": {"driver": "file", "filename": str(top)},
            },
        )
        s.ok(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": "ro",
                "read-only": True,
                "backing": None,
                "file": {"driver": "file", "filename": str(mid)},
            },
        )
        s.ok("block-dirty-bitmap-add", {"node": "top", "name": "v", "granularity": 65536})
        nodes = s.ok("query-named-block-nodes")
        seen[kind] = {n["node-name"]: _strip(n) for n in nodes if n["node-name"] in ("top", "ro")}
        s.ok("blockdev-del", {"node-name": "top"})
        s.ok("blockdev-del", {"node-name": "ro"})
        s.close()
        d.stop()
    assert seen["blockd"] == seen["qsd"]
    img = seen["blockd"]["top"]["image"]
    assert img["backing-image"]["backing-image"]["format-specific"]["data"]["compat"] == "0.10"
    assert [b["name"] for b in img["format-specific"]["data"]["bitmaps"]] == ["pb"]
