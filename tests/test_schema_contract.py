"""schema/ is the published contract: it must be what the code generates today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _render() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("gen_schema", ROOT / "scripts" / "gen_schema.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.render()  # type: ignore[no-any-return]


def test_schema_is_current() -> None:
    stale = []
    for name, text in _render().items():
        path = ROOT / "schema" / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
    assert not stale, (
        f"schema/ is stale ({', '.join(stale)}): run scripts/gen_schema.py and add a "
        "schema/CHANGES.md entry"
    )


def test_introspection_names_libvirt_probes() -> None:
    """The names management tools probe for must be there (commands, members, enum values)."""
    import json

    intro = json.loads((ROOT / "schema" / "qmp-introspection.json").read_text())
    by_name = {e["name"]: e for e in intro}
    for cmd in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "query-qmp-schema",
        "quit",
        "blockdev-add",
        "blockdev-del",
        "query-named-block-nodes",
        "blockdev-create",
        "query-jobs",
        "query-block-jobs",
        "job-pause",
        "job-resume",
        "job-cancel",
        "job-complete",
        "job-finalize",
        "job-dismiss",
    ]:
        assert by_name[cmd]["meta-type"] == "command", cmd
    add = by_name[by_name["blockdev-add"]["arg-type"]]
    assert add["tag"] == "driver"
    cases = {v["case"] for v in add["variants"]}
    assert {"file", "raw", "null-co", "blkdebug", "qcow2"} <= cases
    members = {m["name"] for m in add["members"]}
    assert {"driver", "node-name", "read-only", "auto-read-only", "detect-zeroes"} <= members
    driver_enum = next(m for m in add["members"] if m["name"] == "driver")["type"]
    assert "qcow2" in by_name[driver_enum]["values"]
    create = by_name[by_name["blockdev-create"]["arg-type"]]
    assert {m["name"] for m in create["members"]} == {"job-id", "options"}
    assert "JOB_STATUS_CHANGE" in by_name and by_name["JOB_STATUS_CHANGE"]["meta-type"] == "event"
