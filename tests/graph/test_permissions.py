"""Permission conflicts compared with qemu-storage-daemon, graph shape by graph shape.

Each shape is a list of QMP commands played on blockd and on QSD against identical images; the
replies (success, or error class and text) must be the same, implicit node names aside. These
are the shapes where two writers could share an image or a job could corrupt its own source.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from diffsupport import Session, run_both
from support import qemu_img

Step = tuple[str, dict[str, Any]]


def _images(d: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", d / "a.qcow2", "64M")
    qemu_img("create", "-q", "-f", "qcow2", d / "t.qcow2", "64M")
    qemu_img("create", "-q", "-f", "raw", d / "a.raw", "64M")
    qemu_img("create", "-q", "-f", "raw", d / "t.raw", "64M")
    # A raw source as long as the qcow2 file, to back up onto the file under a qcow2 node
    # (truncated by hand: qemu-img would round the size up to 512 bytes).
    with open(d / "s.raw", "wb") as f:
        f.truncate((d / "t.qcow2").stat().st_size)


def _file(name: str, path: Path, **kw: Any) -> Step:
    return ("blockdev-add", {"driver": "file", "node-name": name, "filename": str(path), **kw})


def _fmt(drv: str, name: str, file: Any, **kw: Any) -> Step:
    return ("blockdev-add", {"driver": drv, "node-name": name, "file": file, **kw})


def _inline(path: Path) -> dict[str, Any]:
    return {"driver": "file", "filename": str(path)}


def _nbd(d: Path) -> Step:
    return ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(d / "nbd.sock")}}})


def _export(eid: str, node: str, writable: bool) -> Step:
    return (
        "block-export-add",
        {"type": "nbd", "id": eid, "node-name": node, "writable": writable},
    )


def _backup(job: str, device: str, target: str, **kw: Any) -> Step:
    args = {"job-id": job, "device": device, "target": target, "sync": "full", **kw}
    return ("blockdev-backup", args)


def two_formats_on_one_file(d: Path) -> list[Step]:
    return [
        _file("F", d / "a.qcow2"),
        _fmt("qcow2", "A", "F"),
        _fmt("qcow2", "B", "F"),
        _fmt("qcow2", "C", "F", **{"read-only": True}),
        _fmt("raw", "R", "F"),
        _nbd(d),
        _export("eA", "A", True),
        _export("eR", "R", True),
        _export("eR2", "R", False),
    ]


def writer_above_reader(d: Path) -> list[Step]:
    return [
        _file("F", d / "a.raw"),
        _fmt("raw", "R", "F"),
        _fmt("raw", "S", "F"),
        _nbd(d),
        _export("e1", "R", False),
        _export("e2", "S", True),
        _export("e3", "F", True),
        _fmt("qcow2", "Q", "F"),
    ]


def writable_export_then_format(d: Path) -> list[Step]:
    return [
        _file("F", d / "a.qcow2"),
        _nbd(d),
        _export("e1", "F", True),
        _fmt("qcow2", "A", "F"),
        _fmt("qcow2", "B", "F", **{"read-only": True}),
    ]


def second_read_write_open(d: Path) -> list[Step]:
    img = d / "a.qcow2"
    return [
        _fmt("qcow2", "A", _inline(img)),
        _fmt("qcow2", "B", _inline(img)),
        _fmt("qcow2", "C", _inline(img), **{"read-only": True}),
        _fmt("raw", "D", _inline(img)),
        _file("E", img),
        _nbd(d),
        _export("eD", "D", True),
        _export("eE", "E", False),
    ]


def read_only_then_writer(d: Path) -> list[Step]:
    img = d / "a.qcow2"
    return [
        _fmt("qcow2", "A", _inline(img), **{"read-only": True}),
        _nbd(d),
        _export("e1", "A", True),
        _fmt("qcow2", "B", _inline(img)),
        _fmt("qcow2", "C", _inline(img), **{"read-only": True}),
    ]


def backup_target_above_source(d: Path) -> list[Step]:
    return [
        _file("f", d / "a.raw"),
        _fmt("raw", "r", "f"),
        _backup("j1", "f", "r"),
        _backup("j2", "r", "f"),
        _backup("j3", "r", "r"),
        ("query-block-jobs", {}),
    ]


def backup_source_in_target_chain(d: Path) -> list[Step]:
    return [
        _fmt("qcow2", "A", _inline(d / "a.qcow2")),
        _fmt("qcow2", "T", _inline(d / "t.qcow2"), backing="A"),
        _backup("j1", "A", "T"),
        ("query-block-jobs", {}),
    ]


def export_of_backup_nodes(d: Path) -> list[Step]:
    return [
        _fmt("qcow2", "A", {"driver": "file", "filename": str(d / "a.qcow2"), "node-name": "AF"}),
        _fmt("qcow2", "T", _inline(d / "t.qcow2")),
        _nbd(d),
        _export("e0", "A", True),
        _backup("j", "A", "T", speed=1, **{"filter-node-name": "cbwf"}),
        _export("e1", "T", True),
        _export("e2", "A", True),
        _export("e3", "A", False),
        _fmt("raw", "R", "AF"),
        _fmt("raw", "R2", "A"),
        _export("e4", "R2", True),
        ("blockdev-del", {"node-name": "T"}),
        ("blockdev-del", {"node-name": "A"}),
        ("blockdev-del", {"node-name": "cbwf"}),
        ("blockdev-del", {"node-name": "AF"}),
        ("block-job-cancel", {"device": "j", "force": True}),
    ]


def backup_target_in_use(d: Path) -> list[Step]:
    return [
        _file("F", d / "t.qcow2"),
        _fmt("qcow2", "T", "F"),
        _fmt("raw", "S", _inline(d / "s.raw")),
        _fmt("qcow2", "A", _inline(d / "a.qcow2")),
        _backup("j1", "S", "F"),
        _backup("j1", "S", "T"),
        _fmt("raw", "R", _inline(d / "t.raw")),
        _nbd(d),
        _export("eR", "R", False),
        _backup("j2", "A", "R", speed=1),
        ("query-block-jobs", {}),
    ]


def snapshot_of_node_with_writer(d: Path) -> list[Step]:
    return [
        _fmt("qcow2", "A", _inline(d / "a.qcow2")),
        _nbd(d),
        _export("e1", "A", True),
        (
            "blockdev-snapshot-sync",
            {
                "node-name": "A",
                "snapshot-file": str(d / "s.qcow2"),
                "snapshot-node-name": "S",
                "format": "qcow2",
            },
        ),
        _fmt("qcow2", "A2", _inline(d / "a.qcow2"), **{"read-only": True}),
        _fmt("raw", "W", _inline(d / "a.qcow2")),
        _export("eW", "W", True),
    ]


SHAPES: dict[str, Callable[[Path], list[Step]]] = {
    f.__name__: f
    for f in (
        two_formats_on_one_file,
        writer_above_reader,
        writable_export_then_format,
        second_read_write_open,
        read_only_then_writer,
        backup_target_above_source,
        backup_source_in_target_chain,
        export_of_backup_nodes,
        backup_target_in_use,
        snapshot_of_node_with_writer,
    )
}

_IMPLICIT = re.compile(r"#block\d+")


def _outcome(s: Session, steps: list[Step], d: Path) -> list[str]:
    out = []
    for name, args in steps:
        r = s.cmd(name, args)
        if "error" in r:
            text = f"{name}: {r['error']['class']}: {r['error']['desc']}"
        elif name == "query-block-jobs":
            text = f"{name}: {sorted(j['device'] for j in r['return'])}"
        else:
            text = f"{name}: ok"
        out.append(_IMPLICIT.sub("#block", text.replace(str(d), "$DIR")))
    return out


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_conflicts_match_qsd(tmp_path: Path, shape: str) -> None:
    build = SHAPES[shape]
    res = run_both(tmp_path, _images, lambda s, d: _outcome(s, build(d), d))
    assert res["blockd"] == res["qsd"]
    # Every shape refuses something: the comparison is never between two lists of "ok".
    assert any(": ok" not in line for line in res["qsd"]), res["qsd"]


def test_writable_image_is_locked_against_other_processes(
    tmp_path: Path, blockd_factory: Callable[..., Any]
) -> None:
    """A read-write qcow2 node takes write on its file at open, as QEMU's format nodes do:
    qemu-img and a second daemon are refused while it is open, and welcome after."""
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "16M")
    first = blockd_factory(name="first")
    s = Session(first.sock)
    s.ok("blockdev-add", {"driver": "qcow2", "node-name": "A", "file": _inline(img)})
    res = qemu_img("info", img, check=False)
    assert res.returncode == 1
    assert 'Failed to get shared "write" lock' in res.stderr
    qemu_img("info", "-U", img)
    second = blockd_factory(name="second")
    s2 = Session(second.sock)
    err = s2.err("blockdev-add", {"driver": "qcow2", "node-name": "B", "file": _inline(img)})
    assert err == 'Failed to get "write" lock'
    ro = {"driver": "qcow2", "node-name": "C", "read-only": True, "file": _inline(img)}
    assert s2.err("blockdev-add", ro) == 'Failed to get shared "write" lock'
    s.ok("blockdev-del", {"node-name": "A"})
    qemu_img("info", img)
    s2.ok("blockdev-add", {"driver": "qcow2", "node-name": "B", "file": _inline(img)})
    s.close()
    s2.close()
