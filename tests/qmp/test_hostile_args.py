"""Every command blockd registers, sent wrong-typed and hostile values in every member it has
(and in the members of the objects it takes, one level down, for every union branch): no reply
may be an internal error with Python's text, nothing may be logged as one, and the daemon
keeps answering. The cases are generated from blockd's own query-qmp-schema, so a new command
or member is swept without changing this test.

The daemon runs in the test's directory, so relative names it creates stay there; no value
is a path outside it, and host names are numeric or invalid (nothing goes to a resolver).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rawclient import RawQmp
from support import start_blockd

HOSTILE: list[Any] = [
    None,
    True,
    -1,
    2**63,
    2**64,
    -(2**63) - 1,
    0.5,
    "",
    "a\u0000b",
    "\n\r\x1b[2K",
    "x" * 4096,
    [],
    [1],
    {},
    {"a": 1},
]
#: Values that make a member plausible, by member name (the rest by type).
PLAUSIBLE = {"host": "127.0.0.1", "port": "0", "cid": "1"}
#: Top-level members that name something new: each case gets its own name, so a case is not
#: refused as a duplicate before its hostile value is looked at. Other names stay "x", the
#: node every command can find.
FRESH = ("node-name", "job-id", "snapshot-node-name", "id", "name")
SKIP = {"quit"}


class Schema:
    def __init__(self, entities: list[dict[str, Any]]) -> None:
        self.by = {e["name"]: e for e in entities}

    def value(self, tname: str, member: str = "", depth: int = 0) -> Any:
        """A plausible value of type *tname* (first branch of unions and alternates)."""
        e = self.by[tname]
        meta = e["meta-type"]
        if member in PLAUSIBLE and meta == "builtin" and e["json-type"] == "string":
            return PLAUSIBLE[member]
        if meta == "builtin":
            return {"string": "x", "int": 1, "boolean": False, "number": 1.0, "null": None}.get(
                e["json-type"], {}
            )
        if meta == "enum":
            return e["values"][0]
        if meta == "array":
            return []
        if meta == "alternate":
            # An object one level down (its members get swept), a reference deeper down.
            kinds = {self.by[m["type"]]["meta-type"]: m["type"] for m in e["members"]}
            if depth <= 1 and "object" in kinds:
                return self.value(kinds["object"], member, depth)
            return self.value(kinds.get("builtin", e["members"][0]["type"]), member, depth)
        return next(self.objects(tname, depth))

    def objects(self, tname: str, depth: int = 0) -> Iterator[dict[str, Any]]:
        """One plausible object per union branch, required members only."""
        e = self.by[tname]
        cases = e.get("variants") or [None]
        for case in cases:
            out: dict[str, Any] = {}
            members = list(e["members"])
            if case is not None:
                members += self.by[case["type"]]["members"]
            for m in members:
                if "default" in m or depth > 3:
                    continue
                out[m["name"]] = self.value(m["type"], m["name"], depth + 1)
            if case is not None:
                out[e["tag"]] = case["case"]
            yield out

    def member_paths(self, tname: str, base: dict[str, Any]) -> Iterator[list[str]]:
        """Paths of every member of *base*'s branch, and of members of object members."""
        e = self.by[tname]
        members = list(e["members"])
        if e.get("variants"):
            case = next(v for v in e["variants"] if v["case"] == base[e["tag"]])
            members += self.by[case["type"]]["members"]
        for m in members:
            yield [m["name"]]
            sub = self.by[m["type"]]
            if sub["meta-type"] == "alternate":
                objs = [
                    x["type"] for x in sub["members"] if self.by[x["type"]]["meta-type"] == "object"
                ]
                sub = self.by[objs[0]] if objs else sub
            if sub["meta-type"] == "object" and isinstance(base.get(m["name"]), dict):
                for inner in self.member_paths(sub["name"], base[m["name"]]):
                    if len(inner) == 1:
                        yield [m["name"], *inner]


def _cases(schema: Schema) -> Iterator[tuple[str, dict[str, Any]]]:
    for cmd in sorted(n for n, e in schema.by.items() if e["meta-type"] == "command"):
        if cmd in SKIP:
            continue
        arg_type = schema.by[cmd]["arg-type"]
        members = {m["name"] for m in schema.by[arg_type].get("members", [])}
        for base in schema.objects(arg_type):
            for key in FRESH:
                if key in members and key not in base and cmd.endswith("-add"):
                    base[key] = "x"
            for path in schema.member_paths(arg_type, base):
                for bad in HOSTILE:
                    args = copy.deepcopy(base)
                    cur = args
                    for key in path[:-1]:
                        cur = cur[key]
                    cur[path[-1]] = bad
                    yield cmd, args


def test_hostile_values_in_every_member_of_every_command(tmp_path: Path) -> None:
    d = start_blockd(tmp_path, cwd=tmp_path)
    bad: list[str] = []
    count = 0
    try:
        q = RawQmp(d.sock, timeout=60)
        q.negotiate()
        q.cmd("blockdev-add", {"driver": "null-co", "node-name": "x"})
        schema = Schema(q.cmd("query-qmp-schema")["return"])
        for cmd, args in _cases(schema):
            count += 1
            for key in FRESH:
                if args.get(key) == "x" and cmd != "block-dirty-bitmap-remove":
                    args[key] = f"x{count}"
            reply = q.cmd(cmd, args)
            desc = reply.get("error", {}).get("desc", "")
            if "Internal error" in desc or "Traceback" in desc:
                bad.append(f"{cmd} {json.dumps(args)[:200]} -> {desc}")
        assert "return" in q.cmd("query-version")
        q.close()
    finally:
        assert d.stop() == 0
    assert count > 2000, count
    assert not bad, "\n".join(bad[:20])
    log = d.log_text()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]
