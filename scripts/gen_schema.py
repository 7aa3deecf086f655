#!/usr/bin/env python3
"""Write schema/: the published QMP contract, generated from blockd's command registry.

- schema/qmp-introspection.json: exactly what ``query-qmp-schema`` returns.
- schema/commands.json: per command, the JSON Schema of its arguments (pydantic), for humans
  and client generators.

``tests/test_schema_contract.py`` fails when these files are stale: run this script and add
a line to schema/CHANGES.md whenever the wire contract changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def render() -> dict[str, str]:
    from pydantic import TypeAdapter

    from blockd.qmp import registry
    from blockd.qmp.introspect import build_schema

    registry.load_all()
    intro = build_schema()
    commands: dict[str, Any] = {}
    for name in sorted(registry.COMMANDS):
        cmd = registry.COMMANDS[name]
        schema = TypeAdapter(cmd.args).json_schema(by_alias=True)
        commands[name] = {"arguments": schema, "features": list(cmd.features)}
    events = {
        name: TypeAdapter(ev.data).json_schema(by_alias=True)
        for name, ev in sorted(registry.EVENTS.items())
    }
    return {
        "qmp-introspection.json": json.dumps(intro, indent=1, sort_keys=True) + "\n",
        "commands.json": json.dumps(
            {"commands": commands, "events": events}, indent=1, sort_keys=True
        )
        + "\n",
    }


def main() -> int:
    out = ROOT / "schema"
    out.mkdir(exist_ok=True)
    for name, text in render().items():
        (out / name).write_text(text)
        print(f"wrote schema/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
