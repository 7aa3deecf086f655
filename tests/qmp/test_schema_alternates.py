"""query-qmp-schema publishes alternates the way QEMU does: the null branch of
``BlockdevRefOrNull`` is the ``null`` builtin, not ``any``. Both daemons are asked in the same
run and their entities compared by shape (QEMU's numbering of types is arbitrary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rawclient import RawQmp
from support import start_blockd, start_qsd


def _schema(tmp: Path, kind: str) -> dict[str, dict[str, Any]]:
    tmp.mkdir()
    d = start_blockd(tmp) if kind == "blockd" else start_qsd(tmp)
    try:
        q = RawQmp(d.sock, timeout=30)
        q.negotiate()
        entities = q.cmd("query-qmp-schema")["return"]
        q.close()
    finally:
        d.stop()
    return {e["name"]: e for e in entities}


def _shape(by: dict[str, dict[str, Any]], name: str) -> Any:
    """A type as a structure without QEMU's arbitrary numbers (objects by meta-type only)."""
    e = by[name]
    meta = e["meta-type"]
    if meta == "builtin":
        return {"builtin": name, "json-type": e["json-type"]}
    if meta == "alternate":
        return {"alternate": sorted((_shape(by, m["type"]) for m in e["members"]), key=repr)}
    if meta == "array":
        return {"array": _shape(by, e["element-type"])}
    if meta == "enum":
        return {"enum": sorted(e["values"])}
    return {"object": sorted(m["name"] for m in e["members"])[:3]}


def _member(by: dict[str, dict[str, Any]], driver: str, member: str) -> str:
    """The type name of *member* of blockdev-add's *driver* branch."""
    add = by[by["blockdev-add"]["arg-type"]]
    variant = next(v["type"] for v in add["variants"] if v["case"] == driver)
    return str(next(m["type"] for m in by[variant]["members"] if m["name"] == member))


def test_null_branch_of_alternates_matches_qsd(tmp_path: Path) -> None:
    schemas = {kind: _schema(tmp_path / kind, kind) for kind in ("blockd", "qsd")}
    for by in schemas.values():
        assert by.get("null") == {"name": "null", "meta-type": "builtin", "json-type": "null"}
    shapes = {}
    for kind, by in schemas.items():
        backing = _shape(by, _member(by, "qcow2", "backing"))
        file = _shape(by, _member(by, "qcow2", "file"))
        # The object branch is BlockdevOptions; compare only that it is an object.
        shapes[kind] = [
            [b if "object" not in b else "object" for b in s["alternate"]] for s in (backing, file)
        ]
    assert shapes["blockd"] == shapes["qsd"]
    assert {"builtin": "null", "json-type": "null"} in shapes["blockd"][0]
