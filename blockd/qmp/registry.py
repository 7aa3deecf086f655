"""The one registry of QMP commands and events.

A command is a coroutine ``async def qmp_x(ctx, args) -> result`` registered with
:func:`command`, naming its argument model and its reply type. Dispatch, ``query-commands``,
``query-qmp-schema`` and the published ``schema/`` all read this registry, so a command cannot
exist on the wire without being described, nor be described without existing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockd.qapi.base import ArgsValidator, QapiModel

if TYPE_CHECKING:
    from blockd.daemon import Daemon
    from blockd.qmp.session import QmpSession


class NoArgs(QapiModel):
    """Arguments of a command that takes none."""


@dataclass
class Context:
    """What a command handler gets besides its arguments."""

    daemon: Daemon
    session: QmpSession | None


Handler = Callable[[Context, Any], Awaitable[Any]]


@dataclass
class Command:
    name: str
    handler: Handler
    #: A model class, or a flat union (``blockdev-add`` takes ``BlockdevOptions`` itself).
    args: Any
    returns: Any
    features: tuple[str, ...] = ()
    #: Allowed before capabilities negotiation (only qmp_capabilities).
    allow_preconfig: bool = False
    validator: ArgsValidator = field(init=False)

    def __post_init__(self) -> None:
        self.validator = ArgsValidator(self.args)


@dataclass
class Event:
    name: str
    data: type[QapiModel]


COMMANDS: dict[str, Command] = {}
EVENTS: dict[str, Event] = {}


def command(
    name: str,
    args: Any = NoArgs,
    returns: Any = None,
    features: tuple[str, ...] = (),
) -> Callable[[Handler], Handler]:
    """Register ``async def handler(ctx, args)`` as QMP command *name*.

    *returns* is the reply's type for introspection (``None``: the empty object ``{}``).
    """

    def deco(fn: Handler) -> Handler:
        if name in COMMANDS:
            raise RuntimeError(f"QMP command {name} registered twice")
        COMMANDS[name] = Command(name, fn, args, returns, features)
        return fn

    return deco


def event(name: str, data: type[QapiModel]) -> None:
    """Declare an event and its payload model (for introspection and docs)."""
    EVENTS[name] = Event(name, data)


_loaded = False


def load_all() -> None:
    """Import every command module so the registry is complete."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    import blockd.qmp.commands as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
