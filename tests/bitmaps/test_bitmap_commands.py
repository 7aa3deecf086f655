"""block-dirty-bitmap-* commands: the same requests against qemu-storage-daemon 7.2 and blockd
must give the same replies (errors word for word) and the same query-named-block-nodes
bitmap lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffsupport import MiB, Session, norm, raw_image, raw_node, run_both

LONG = "x" * 1024
OK_LONG = "y" * 1023

STEPS: list[tuple[str, dict[str, Any]]] = [
    ("block-dirty-bitmap-add", {"node": "src", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "src", "name": "b0"}),
    ("block-dirty-bitmap-add", {"node": "src", "name": ""}),
    ("block-dirty-bitmap-add", {"node": "nonode", "name": ""}),
    ("block-dirty-bitmap-add", {"node": "nonode", "name": "p"}),
    ("block-dirty-bitmap-add", {"node": "src", "name": LONG}),
    ("block-dirty-bitmap-add", {"node": "src", "name": OK_LONG}),
    ("block-dirty-bitmap-add", {"node": "src", "name": "g", "granularity": 1000}),
    ("block-dirty-bitmap-add", {"node": "src", "name": "g", "granularity": 256}),
    ("block-dirty-bitmap-add", {"node": "src", "name": "g", "granularity": 0}),
    ("block-dirty-bitmap-add", {"node": "src", "name": "g", "granularity": -1}),
    ("block-dirty-bitmap-add", {"node": "src", "name": "g", "granularity": 2**32}),
    ("block-dirty-bitmap-add", {"node": "src", "name": "g1", "granularity": 512}),
    ("block-dirty-bitmap-add", {"node": "src", "name": "g2", "granularity": 2**31}),
    ("block-dirty-bitmap-add", {"node": "src", "name": "p", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "nul", "name": "p", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "src", "name": "d", "disabled": True}),
    ("block-dirty-bitmap-add", {"node": "srcf", "name": "f0"}),
    ("block-dirty-bitmap-add", {"node": "nul", "name": "n0"}),
    ("block-dirty-bitmap-add", {"node": "src", "name": "b0", "bogus": 1}),
    ("block-dirty-bitmap-add", {"node": "src"}),
    ("block-dirty-bitmap-disable", {"node": "src", "name": "b0"}),
    ("block-dirty-bitmap-disable", {"node": "src", "name": "b0"}),
    ("block-dirty-bitmap-enable", {"node": "src", "name": "d"}),
    ("block-dirty-bitmap-enable", {"node": "src", "name": "d"}),
    ("block-dirty-bitmap-enable", {"node": "src", "name": "nob"}),
    ("block-dirty-bitmap-disable", {"node": "nonode", "name": "b0"}),
    ("block-dirty-bitmap-clear", {"node": "src", "name": "b0"}),
    ("block-dirty-bitmap-clear", {"node": "src", "name": "nob"}),
    ("block-dirty-bitmap-clear", {"node": "nonode", "name": "b0"}),
    ("block-dirty-bitmap-remove", {"node": "src", "name": "nob"}),
    ("block-dirty-bitmap-remove", {"node": "nonode", "name": "nob"}),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "b0", "bitmaps": ["d"]}),
    (
        "block-dirty-bitmap-merge",
        {"node": "src", "target": "b0", "bitmaps": ["b0", {"node": "src", "name": "g1"}]},
    ),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "g2", "bitmaps": ["g1", "b0"]}),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "nob", "bitmaps": ["b0"]}),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "b0", "bitmaps": ["nob"]}),
    ("block-dirty-bitmap-merge", {"node": "nonode", "target": "b0", "bitmaps": ["b0"]}),
    (
        "block-dirty-bitmap-merge",
        {"node": "src", "target": "b0", "bitmaps": [{"node": "nonode", "name": "x"}]},
    ),
    (
        "block-dirty-bitmap-merge",
        {"node": "src", "target": "b0", "bitmaps": [{"node": "nul", "name": "zz"}]},
    ),
    ("block-dirty-bitmap-merge", {"node": "src", "target": "b0", "bitmaps": [5]}),
    ("block-dirty-bitmap-remove", {"node": "src", "name": "g1"}),
    ("block-dirty-bitmap-remove", {"node": "src", "name": "g1"}),
]


def _build(d: Path) -> None:
    raw_image(d / "src.raw", 4 * MiB)


def _scenario(s: Session, d: Path) -> list[Any]:
    s.ok(
        "blockdev-add",
        {
            **raw_node("src", d / "src.raw"),
            "file": {"driver": "file", "node-name": "srcf", "filename": str(d / "src.raw")},
        },
    )
    s.ok("blockdev-add", {"driver": "null-co", "node-name": "nul", "size": 4 * MiB})
    out: list[Any] = []
    for cmd, args in STEPS:
        r = s.cmd(cmd, args)
        out.append([cmd, args.get("name"), r.get("return", r.get("error"))])
    nodes = s.ok("query-named-block-nodes", {"flat": True})
    out.append(
        [
            (n["node-name"], n.get("dirty-bitmaps"))
            for n in nodes
            if not n["node-name"].startswith("#")
        ]
    )
    return norm(out, d)


def test_bitmap_commands_match_qsd(tmp_path: Path) -> None:
    res = run_both(tmp_path, _build, _scenario)
    diffs = [(g, w) for g, w in zip(res["blockd"], res["qsd"], strict=True) if g != w]
    assert not diffs, "\n".join(f"blockd {g}\n   qsd {w}" for g, w in diffs)


def test_merge_with_empty_list_is_a_noop(qmp_session: Session) -> None:
    s = qmp_session
    s.ok("blockdev-add", {"driver": "null-co", "node-name": "n", "size": MiB})
    s.ok("block-dirty-bitmap-add", {"node": "n", "name": "b"})
    assert s.ok("block-dirty-bitmap-merge", {"node": "n", "target": "b", "bitmaps": []}) == {}
    assert s.bitmap("n", "b")["count"] == 0
    assert (
        s.err("block-dirty-bitmap-merge", {"node": "n", "target": "nob", "bitmaps": []})
        == "Dirty bitmap 'nob' not found"
    )
