"""``query-qmp-schema`` built from the registry and the models (QEMU's qapi/introspect.py).

The output has QEMU's SchemaInfo shape: commands and events under their real names, every
other type under an opaque number, arrays as ``[N]``, builtins by name, optional members with
``"default": null``, flat unions as one object with ``tag`` and ``variants``. Tools that probe
QEMU for a command, a member or an enum value find the same answers in blockd.
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any

from pydantic import BaseModel

from blockd.qapi.base import union_meta
from blockd.qmp.registry import COMMANDS, EVENTS, NoArgs

_BUILTINS = {
    str: ("str", "string"),
    int: ("int", "int"),
    bool: ("bool", "boolean"),
    float: ("number", "number"),
    type(None): ("null", "null"),
}


class _Builder:
    def __init__(self) -> None:
        self.entities: list[dict[str, Any]] = []
        self._names: dict[Any, str] = {}
        self._builtins: set[str] = set()
        self._counter = 0
        empty = self._new_name()
        self.empty = empty
        self.entities.append({"name": empty, "meta-type": "object", "members": []})

    def _new_name(self) -> str:
        name = str(self._counter)
        self._counter += 1
        return name

    def _builtin(self, tp: Any) -> str:
        name, json_type = _BUILTINS[tp]
        if name not in self._builtins:
            self._builtins.add(name)
            self.entities.append({"name": name, "meta-type": "builtin", "json-type": json_type})
        return name

    def _any(self) -> str:
        if "any" not in self._builtins:
            self._builtins.add("any")
            self.entities.append({"name": "any", "meta-type": "builtin", "json-type": "value"})
        return "any"

    def ref(self, tp: Any) -> str:
        if tp is None:
            # An alternate's null branch (``BlockdevRefOrNull``) is written as ``None``.
            tp = type(None)
        meta = union_meta(tp)
        if meta is not None:
            return self._union(meta)
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            return self.ref(typing.get_args(tp)[0])
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                return self.ref(args[0])
            return self._any()
        if origin is list:
            return self._array(typing.get_args(tp)[0])
        if origin is dict or tp is Any or tp is dict:
            return self._any()
        if origin is typing.Literal:
            value = typing.get_args(tp)[0]
            return self.ref(type(value)) if isinstance(value, enum.Enum) else self._builtin(str)
        if tp in _BUILTINS:
            return self._builtin(tp)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self._enum(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return self._object(tp)
        return self._any()

    def _array(self, element: Any) -> str:
        el = self.ref(element)
        name = f"[{el}]"
        if name not in self._names.values():
            self._names[("array", el)] = name
            self.entities.append({"name": name, "meta-type": "array", "element-type": el})
        return name

    def _enum(self, tp: type[enum.Enum]) -> str:
        if tp in self._names:
            return self._names[tp]
        name = self._names[tp] = self._new_name()
        values = [str(m.value) for m in tp]
        self.entities.append(
            {
                "name": name,
                "meta-type": "enum",
                "members": [{"name": v} for v in values],
                "values": values,
            }
        )
        return name

    def _members(
        self, model: type[BaseModel], skip: frozenset[str] = frozenset()
    ) -> list[dict[str, Any]]:
        out = []
        for fname, field in model.model_fields.items():
            wire = field.alias or fname
            if wire in skip:
                continue
            ann = field.annotation
            member: dict[str, Any] = {"name": wire}
            meta = next((m for m in field.metadata if hasattr(m, "kind")), None)
            member["type"] = self._union(meta) if meta is not None else self.ref(ann)
            if not field.is_required():
                member["default"] = None
            if wire.startswith("x-"):
                member["features"] = ["unstable"]
            out.append(member)
        return out

    def _object(self, model: type[BaseModel]) -> str:
        if model is NoArgs or not model.model_fields:
            return self.empty
        if model in self._names:
            return self._names[model]
        name = self._names[model] = self._new_name()
        entity: dict[str, Any] = {"name": name, "meta-type": "object", "members": []}
        self.entities.append(entity)
        entity["members"] = self._members(model)
        return name

    def _union(self, meta: Any) -> str:
        key = ("union", meta.name)
        if key in self._names:
            return self._names[key]
        name = self._names[key] = self._new_name()
        if meta.kind == "alternate":
            entity: dict[str, Any] = {"name": name, "meta-type": "alternate", "members": []}
            self.entities.append(entity)
            entity["members"] = [{"type": self.ref(tp)} for tp in meta.branches.values()]
            return name
        branches: dict[str, type[BaseModel]] = meta.branches
        first = next(iter(branches.values()))
        base = next(
            (
                b
                for b in first.__mro__[1:]
                if isinstance(b, type)
                and issubclass(b, BaseModel)
                and meta.tag.replace("-", "_") in getattr(b, "model_fields", {})
            ),
            first,
        )
        entity = {"name": name, "meta-type": "object", "members": [], "tag": meta.tag}
        self.entities.append(entity)
        entity["members"] = self._members(base)
        base_names = {m["name"] for m in entity["members"]}
        variants = []
        for case, model in branches.items():
            rest = self._members(model, skip=frozenset(base_names))
            if not rest:
                vtype = self.empty
            else:
                vkey = ("variant", meta.name, case)
                vtype = self._names.get(vkey) or self._new_name()
                if vkey not in self._names:
                    self._names[vkey] = vtype
                    self.entities.append({"name": vtype, "meta-type": "object", "members": rest})
            variants.append({"case": case, "type": vtype})
        entity["variants"] = variants
        return name


def build_schema() -> list[dict[str, Any]]:
    """The whole introspection list: commands, events and every type they reach."""
    b = _Builder()
    for name in sorted(COMMANDS):
        cmd = COMMANDS[name]
        entity: dict[str, Any] = {
            "name": name,
            "meta-type": "command",
            "arg-type": b.ref(cmd.args),
            "ret-type": b.empty if cmd.returns is None else b.ref(cmd.returns),
        }
        if cmd.features:
            entity["features"] = list(cmd.features)
        b.entities.append(entity)
    for name in sorted(EVENTS):
        b.entities.append(
            {"name": name, "meta-type": "event", "arg-type": b.ref(EVENTS[name].data)}
        )
    return b.entities
