"""Monitor control commands: negotiation, version, the command list, introspection, quit."""

from __future__ import annotations

from typing import Any

from blockd import QEMU_COMPAT_VERSION, __version__
from blockd.qapi.base import QapiEnum, QapiModel
from blockd.qmp.registry import COMMANDS, Context, command


class QMPCapability(QapiEnum):
    OOB = "oob"


class QmpCapabilitiesArgs(QapiModel):
    enable: list[QMPCapability] | None = None


class VersionTriple(QapiModel):
    major: int
    minor: int
    micro: int


class VersionInfo(QapiModel):
    qemu: VersionTriple
    package: str


class CommandInfo(QapiModel):
    name: str


class SchemaInfo(QapiModel):
    name: str
    meta_type: str


@command("qmp_capabilities", QmpCapabilitiesArgs)
async def qmp_qmp_capabilities(ctx: Context, args: QmpCapabilitiesArgs) -> None:
    assert ctx.session is not None
    ctx.session.negotiated(oob=QMPCapability.OOB in (args.enable or []))


@command("query-version", returns=VersionInfo)
async def qmp_query_version(ctx: Context, args: Any) -> dict[str, Any]:
    major, minor, micro = QEMU_COMPAT_VERSION
    return {
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": f"blockd {__version__}",
    }


@command("query-commands", returns=list[CommandInfo])
async def qmp_query_commands(ctx: Context, args: Any) -> list[dict[str, str]]:
    return [{"name": name} for name in sorted(COMMANDS)]


_schema_cache: list[dict[str, Any]] | None = None


@command("query-qmp-schema", returns=list[SchemaInfo])
async def qmp_query_qmp_schema(ctx: Context, args: Any) -> list[dict[str, Any]]:
    global _schema_cache
    if _schema_cache is None:
        from blockd.qmp.introspect import build_schema

        _schema_cache = build_schema()
    return _schema_cache


@command("quit")
async def qmp_quit(ctx: Context, args: Any) -> None:
    """Jobs are cancelled inside the command, so their events precede the reply (as QSD)."""
    await ctx.daemon.jobs.cancel_all()
    if ctx.session is not None:
        ctx.session.quit_after_reply()
    else:
        ctx.daemon.request_quit()
