"""Model base and QAPI-flavoured type helpers, plus the translation of pydantic errors into
the exact texts QEMU's input visitor prints.

Why strict JSON-mode validation: QMP never coerces (``"5"`` is not an integer, ``1`` is not a
boolean), and pydantic's strict JSON mode has exactly that rule while still accepting enum
values given as strings.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
)

from blockd.errors import QmpError

T = TypeVar("T")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class QapiModel(BaseModel):
    """Base of every wire object: QEMU's member names, unknown members refused."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        populate_by_name=True,
        alias_generator=_kebab,
        use_enum_values=False,
    )

    def wire(self) -> dict[str, Any]:
        """The object as QMP sends it: aliases, no absent optionals."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class QapiEnum(enum.StrEnum):
    """An enum whose values are the wire strings."""


# Integer flavours: introspection calls all of them "int"; the bounds give QEMU's refusals.
Size = Annotated[int, Field(ge=0, le=2**64 - 1)]
UInt32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class _UnionMeta:
    """Marks an annotated union so introspection can publish it as QEMU does."""

    def __init__(self, kind: str, name: str, tag: str | None, branches: Mapping[str, Any]) -> None:
        self.kind = kind  # "flat" (discriminated object union) or "alternate"
        self.name = name
        self.tag = tag
        self.branches = dict(branches)


def flat_union(name: str, tag: str, branches: Mapping[str, type[BaseModel]]) -> Any:
    """A QAPI flat union: the member *tag* picks the branch model.

    Branch tags carry angle brackets so they can never be mistaken for a member name when an
    error location is mapped back onto the input (see :func:`qapi_error_text`).
    """
    attr = _snake(tag)

    def pick(value: Any) -> str | None:
        v = value.get(tag) if isinstance(value, dict) else getattr(value, attr, None)
        if isinstance(v, enum.Enum):
            v = v.value
        return f"<{v}>" if isinstance(v, str) and v in branches else None

    members = tuple(Annotated[model, Tag(f"<{key}>")] for key, model in branches.items())
    return Annotated[
        _union_of(members),
        Discriminator(pick, custom_error_type="qapi_union_tag", custom_error_message=tag),
        _UnionMeta("flat", name, tag, branches),
    ]


def alternate(name: str, branches: Mapping[str, Any]) -> Any:
    """A QAPI alternate: the JSON type of the value picks the branch.

    *branches* maps a JSON type name (``"object"``, ``"string"``, ``"null"``, ``"integer"``,
    ``"boolean"``) to the Python type for it. A value of another JSON type is refused with
    QEMU's "expected: <alternate name>" text.
    """
    kinds = dict(branches)

    def pick(value: Any) -> str | None:
        k = _json_kind(value)
        return f"<{k}>" if k in kinds else None

    members = tuple(Annotated[tp, Tag(f"<{k}>")] for k, tp in kinds.items())
    return Annotated[
        _union_of(members),
        Discriminator(pick, custom_error_type="qapi_alternate", custom_error_message=name),
        _UnionMeta("alternate", name, None, kinds),
    ]


def _union_of(members: tuple[Any, ...]) -> Any:
    from typing import Union

    return Union[members]  # noqa: UP007 - a runtime-built union needs the subscript form


def _snake(name: str) -> str:
    return name.replace("-", "_")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, (dict, BaseModel)):
        return "object"
    return "value"


_EXPECTED = {
    "string_type": "string",
    "int_type": "integer",
    "int_from_float": "integer",
    "int_parsing": "integer",
    "bool_type": "boolean",
    "bool_parsing": "boolean",
    "float_type": "number",
    "list_type": "array",
    "dict_type": "object",
    "model_type": "object",
    "model_attributes_type": "object",
    "none_required": "null",
}


def _path_of(loc: tuple[int | str, ...], data: Any, *, keep_last: bool) -> str:
    """Map a pydantic location onto the input, dropping union-branch labels.

    Only components that are really keys (or list indexes) of the input survive, so the
    result is the path QEMU prints: ``file.filename``, ``actions[1].data``.
    """
    parts: list[str] = []
    cur = data
    for i, comp in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(comp, int) and isinstance(cur, list) and 0 <= comp < len(cur):
            parts.append(f"[{comp}]")
            cur = cur[comp]
        elif isinstance(comp, str) and isinstance(cur, dict) and comp in cur:
            parts.append(("." if parts else "") + comp)
            cur = cur[comp]
        elif last and keep_last and isinstance(comp, str) and not comp.startswith("<"):
            parts.append(("." if parts else "") + comp)
    return "".join(parts)


def _value_at(path_loc: tuple[int | str, ...], data: Any) -> Any:
    cur = data
    for comp in path_loc:
        if isinstance(comp, int) and isinstance(cur, list) and 0 <= comp < len(cur):
            cur = cur[comp]
        elif isinstance(comp, str) and isinstance(cur, dict) and comp in cur:
            cur = cur[comp]
    return cur


def _last_name(path: str) -> str:
    # QEMU names list elements "null" in this message (they have no member name).
    if path.endswith("]"):
        return "null"
    return path.rsplit(".", 1)[-1] or path


def _error_rank(err: Mapping[str, Any]) -> int:
    # QEMU visits declared members first and complains about leftovers last.
    return 1 if err["type"] == "extra_forbidden" else 0


def qapi_error_text(exc: ValidationError, data: Any, prefix: str = "") -> str:
    """The single QEMU-style message for the first problem pydantic found in *data*."""
    errors = sorted(exc.errors(), key=_error_rank)
    err = errors[0]
    loc = tuple(err["loc"])
    typ = err["type"]
    ctx = err.get("ctx") or {}

    def full(p: str) -> str:
        return prefix + p if not prefix or not p else f"{prefix}.{p}"

    if typ == "missing":
        return f"Parameter '{full(_path_of(loc, data, keep_last=True))}' is missing"
    if typ == "extra_forbidden":
        return f"Parameter '{full(_path_of(loc, data, keep_last=True))}' is unexpected"
    if typ == "qapi_union_tag":
        tag = str(err["msg"])
        base = _path_of(loc, data, keep_last=False)
        value = _value_at(loc, data)
        if not isinstance(value, dict):
            return f"Invalid parameter type for '{full(base)}', expected: object"
        if tag not in value:
            return f"Parameter '{full(_join(base, tag))}' is missing"
        raw = value[tag]
        if not isinstance(raw, str):
            return f"Invalid parameter type for '{full(_join(base, tag))}', expected: string"
        return f"Parameter '{tag}' does not accept value '{raw}'"
    if typ == "qapi_alternate":
        path = full(_path_of(loc, data, keep_last=False))
        if path.endswith("]"):
            path = "null"  # QEMU has no member name for a list element here either
        return f"Invalid parameter type for '{path}', expected: {err['msg']}"
    path = full(_path_of(loc, data, keep_last=True))
    if typ in ("enum", "literal_error"):
        value = _value_at(loc, data)
        if not isinstance(value, str):
            return f"Invalid parameter type for '{path}', expected: string"
        return f"Parameter '{_last_name(path)}' does not accept value '{value}'"
    if typ in _EXPECTED:
        return f"Invalid parameter type for '{path}', expected: {_EXPECTED[typ]}"
    if typ in ("greater_than_equal", "greater_than") and ctx.get("ge", ctx.get("gt")) == 0:
        return f"Parameter '{path}' expects a non-negative value"
    if typ in ("less_than_equal", "greater_than_equal"):
        return f"Invalid parameter type for '{path}', expected: integer"
    if typ == "value_error":
        msg = str(err.get("msg", ""))
        return msg.removeprefix("Value error, ")
    return f"Invalid parameter '{path}': {err.get('msg', typ)}"


def _join(base: str, name: str) -> str:
    return f"{base}.{name}" if base and name else base or name


class ArgsValidator:
    """Validates a command's ``arguments`` object into its model, QMP-style."""

    def __init__(self, tp: Any) -> None:
        self.adapter: TypeAdapter[Any] = TypeAdapter(tp)

    def validate(self, data: Any, prefix: str = "") -> Any:
        try:
            return self.adapter.validate_json(json.dumps(data), strict=True)
        except ValidationError as exc:
            raise QmpError(qapi_error_text(exc, data, prefix)) from None


def union_meta(tp: Any) -> _UnionMeta | None:
    """The QAPI union description attached by :func:`flat_union` / :func:`alternate`."""
    for extra in getattr(tp, "__metadata__", ()):
        if isinstance(extra, _UnionMeta):
            return extra
    return None


def validator_for(tp: Any) -> Callable[[Any], Any]:
    """A one-shot validator for ad-hoc types (tests, CLI)."""
    return ArgsValidator(tp).validate
