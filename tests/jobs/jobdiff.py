"""Helpers shared by the mirror and commit tests: what a scenario records so that blockd and
qemu-storage-daemon can be compared (events without timestamps, the graph as node, driver,
read-only flag, backing and depth, with QEMU's generated ``#blockNNN`` names made equal), and
the chains the tests build."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diffsupport import MiB, Session, norm, qcow2_image, qcow2_node, run_both
from support import qemu_img

_GENERATED = re.compile(r"#block\d+")


def graph(s: Session) -> list[tuple[Any, ...]]:
    """query-named-block-nodes as (name, driver, ro, backing_file, depth, internal bitmaps),
    generated names made equal."""
    out = []
    for n in s.ok("query-named-block-nodes"):
        maps = [(b.get("granularity"), b.get("count")) for b in n.get("dirty-bitmaps", [])]
        row = (n["node-name"], n["drv"], n["ro"], n.get("backing_file"), n["backing_file_depth"])
        out.append((*row, maps))
    rows = [json.loads(_GENERATED.sub("#block", json.dumps(list(r)))) for r in out]
    # Sorted: blockd lists a node after the children it opened with it, QEMU before them.
    return sorted(tuple(r) for r in rows)


def events(
    s: Session, *, skip_offset_of: Sequence[str] = (), markers: bool = True
) -> list[tuple[str, Any]]:
    """Events in order without timestamps, with command markers (unless *markers* is
    false: whether a job with nothing to copy is READY before the command's reply depends on
    timing in QSD too); the ``offset`` of the BLOCK_JOB_CANCELLED events of the jobs named is
    dropped (how far a throttled copy got when it was cancelled depends on timing)."""
    out: list[tuple[str, Any]] = []
    for e in s.events:
        name, data = e["event"], dict(e.get("data", {}))
        if name == "->" and not markers:
            continue
        if name == "->":
            out.append(("->", data["cmd"]))
            continue
        if name == "<-":
            continue
        if name == "BLOCK_JOB_CANCELLED" and data.get("device") in skip_offset_of:
            data.pop("offset")
        out.append((name, data))
    return out


def error_of(reply: dict[str, Any]) -> tuple[str, str] | None:
    err = reply.get("error")
    return (err["class"], err["desc"]) if err else None


def chain(d: Path, size: int = 16 * MiB) -> None:
    """base <- mid <- top, each with data of its own, some of it overlapping."""
    qcow2_image(d / "base.qcow2", size, [(0x0B, 0, 4 * MiB), (0x0C, 12 * MiB, MiB)])
    qcow2_image(d / "mid.qcow2", size, [(0x1B, 2 * MiB, 3 * MiB)], backing=d / "base.qcow2")
    qcow2_image(
        d / "top.qcow2",
        size,
        [(0x2B, 4 * MiB, MiB), (0x2C, 15 * MiB, 64 * 1024)],
        backing=d / "mid.qcow2",
    )


def add_chain(s: Session, d: Path) -> None:
    """The chain as qsd-transcripts.md's commit sections open it: named file nodes."""
    for name, backing in (("base", None), ("mid", "base"), ("top", "mid")):
        opts = qcow2_node(name, d / f"{name}.qcow2")
        opts["file"]["node-name"] = f"{name}-file"
        if backing is not None:
            opts["backing"] = backing
        s.ok("blockdev-add", opts)


def header(path: Path) -> dict[str, Any]:
    """What qemu-img says of an image's backing link and size."""
    info = json.loads(qemu_img("info", "-U", "--output=json", path).stdout)
    return {k: info.get(k) for k in ("virtual-size", "backing-filename", "backing-filename-format")}


def backing_chain(path: Path) -> list[tuple[str, str | None]]:
    """``qemu-img info --backing-chain``: each image and the backing file it names."""
    out = json.loads(qemu_img("info", "-U", "--backing-chain", "--output=json", path).stdout)
    return [(Path(i["filename"]).name, i.get("backing-filename")) for i in out]


def assert_same(res: dict[str, Any]) -> dict[str, Any]:
    """blockd's observations equal QSD's; on a difference, say where, line by line."""
    a, b = res["blockd"], res["qsd"]
    if a != b:
        import difflib

        def lines(x: Any) -> list[str]:
            return json.dumps(x, indent=1, sort_keys=True, default=str).splitlines()

        diff = "\n".join(difflib.unified_diff(lines(b), lines(a), "qsd", "blockd", n=2))
        raise AssertionError(f"blockd differs from qemu-storage-daemon:\n{diff}")
    return dict(a)


def both(
    tmp: Path, build: Callable[[Path], None], scenario: Callable[[Session, Path], Any]
) -> dict[str, Any]:
    """Play *scenario* on blockd and on QSD (paths made equal) and require the same
    observations; returns them."""

    def play(s: Session, d: Path) -> Any:
        return json.loads(_GENERATED.sub("#block", json.dumps(norm(scenario(s, d), d))))

    return assert_same(run_both(tmp, build, play))


def chain_of(s: Session, node: str) -> list[tuple[Any, ...]]:
    """The chain under *node* as query-named-block-nodes nests it: (format, filename,
    virtual size) per layer, plus *node*'s read-only flag. For scenarios where blockd keeps
    nodes QSD frees (monitor-owned snapshot overlays, docs/compatibility.md), this is what
    both must agree on."""
    for n in s.ok("query-named-block-nodes"):
        if n["node-name"] == node:
            out: list[tuple[Any, ...]] = [("ro", n["ro"])]
            img: dict[str, Any] | None = n["image"]
            while img is not None:
                out.append((img["format"], img["filename"], img["virtual-size"]))
                img = img.get("backing-image")
            return out
    raise AssertionError(f"no node {node}")
