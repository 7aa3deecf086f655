"""One QMP client connection (QEMU's monitor/qmp.c and qapi/qmp-dispatch.c).

Life of a session: greeting → negotiation mode (only ``qmp_capabilities``) → command mode.
Commands run one at a time in arrival order; events are written between replies as they
happen, so events caused by a command precede its reply, as in QEMU. A client that goes away
mid-command does not cancel the command: its reply is simply dropped.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from typing import TYPE_CHECKING, Any

from blockd import QEMU_COMPAT_VERSION, __version__
from blockd.errors import QmpError
from blockd.qmp.framing import JsonError, JsonStreamer, encode
from blockd.qmp.registry import COMMANDS, Context

if TYPE_CHECKING:
    from blockd.daemon import Daemon

log = logging.getLogger(__name__)

#: A client that does not read its events is dropped past this much unsent output.
MAX_PENDING_OUTPUT = 64 * 1024 * 1024

_ids = itertools.count(1)


class Runstate(enum.Enum):
    NEGOTIATING = "negotiating"
    COMMAND = "command"
    CLOSED = "closed"


def greeting() -> dict[str, Any]:
    major, minor, micro = QEMU_COMPAT_VERSION
    return {
        "QMP": {
            "version": {
                "qemu": {"major": major, "minor": minor, "micro": micro},
                "package": f"blockd {__version__}",
            },
            "capabilities": ["oob"],
        }
    }


class QmpSession:
    def __init__(
        self, daemon: Daemon, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.daemon = daemon
        self.reader = reader
        self.writer = writer
        self.state = Runstate.NEGOTIATING
        self.oob = False
        self.num = next(_ids)
        self.log = logging.LoggerAdapter(log, {})
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
        #: Runs the commands; shutdown cancels it (QmpServer.cancel_commands).
        self.worker: asyncio.Task[None] | None = None

    # -- output ------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        self.send_raw(encode(message))

    def send_raw(self, data: bytes) -> None:
        if self.state is Runstate.CLOSED or self.writer.is_closing():
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() > MAX_PENDING_OUTPUT:
            log.warning("qmp#%d: client does not read its output; dropping it", self.num)
            self.close()
            return
        self.writer.write(data)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("qmp#%d <-- %s", self.num, data[:500].decode(errors="replace").rstrip())

    def close(self) -> None:
        if self.state is not Runstate.CLOSED:
            self.state = Runstate.CLOSED
            self.writer.close()

    @property
    def receives_events(self) -> bool:
        return self.state is Runstate.COMMAND

    # -- main loop ---------------------------------------------------------------------
    async def run(self) -> None:
        self.send(greeting())
        worker = self.worker = asyncio.create_task(self._work(), name=f"qmp#{self.num}")
        streamer = JsonStreamer()
        try:
            while True:
                try:
                    data = await self.reader.read(256 * 1024)
                except (ConnectionError, OSError):
                    break
                if not data:
                    for msg in streamer.finish():
                        await self._queue.put(msg)
                    break
                for msg in streamer.feed(data):
                    await self._queue.put(msg)
        finally:
            await self._queue.put(_EOF)
            try:
                await worker
            finally:
                self.close()
                try:
                    await self.writer.wait_closed()
                except (ConnectionError, OSError):
                    pass

    async def _work(self) -> None:
        while True:
            msg = await self._queue.get()
            if msg is _EOF:
                return
            try:
                reply = await self.handle(msg)
            except Exception:  # a bug: answer, log, keep serving
                log.exception("qmp#%d: internal error", self.num)
                reply = {"error": {"class": "GenericError", "desc": "Internal error"}}
            if reply is not None:
                self.send(reply)
            if getattr(self, "_quit_after_reply", False):
                await self._drain_output()
                self.daemon.request_quit()

    async def _drain_output(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass

    # -- dispatch ----------------------------------------------------------------------
    async def handle(self, msg: Any) -> dict[str, Any] | None:
        if isinstance(msg, JsonError):
            return _error("GenericError", msg.desc)
        if not isinstance(msg, dict):
            return _error("GenericError", "QMP input must be a JSON object")
        has_id = "id" in msg
        rid = msg.get("id")

        def fail(desc: str, cls: str = "GenericError") -> dict[str, Any]:
            return _error(cls, desc, rid, has_id)

        for key, value in msg.items():
            if key in ("execute", "exec-oob"):
                if key == "exec-oob" and not self.oob:
                    return fail("QMP input member 'exec-oob' is unexpected")
                if not isinstance(value, str):
                    return fail(f"QMP input member '{key}' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    return fail("QMP input member 'arguments' must be an object")
            elif key != "id":
                return fail(f"QMP input member '{key}' is unexpected")
        if "execute" in msg and "exec-oob" in msg:
            return fail("QMP input member 'execute' clashes with 'exec-oob'")
        if "execute" not in msg and "exec-oob" not in msg:
            return fail("QMP input lacks member 'execute'")
        name = msg.get("execute", msg.get("exec-oob"))
        assert isinstance(name, str)
        if "exec-oob" in msg:
            return fail(f"The command {name} does not support OOB")
        args = msg.get("arguments", {})

        if self.state is Runstate.NEGOTIATING:
            if name != "qmp_capabilities":
                return fail(
                    "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"
                )
        elif name == "qmp_capabilities":
            return fail(
                "Capabilities negotiation is already complete, command ignored", "CommandNotFound"
            )
        cmd = COMMANDS.get(name)
        if cmd is None:
            return fail(f"The command {name} has not been found", "CommandNotFound")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("qmp#%d --> %s %s", self.num, name, args)
        try:
            parsed = cmd.validator.validate(args)
            if name == "quit":
                # The daemon is going away: quit must not queue behind another client's
                # command that waits without limit (a blockdev-add retrying a server), so
                # those are cancelled now, as the shutdown that follows would cancel them.
                await self.daemon.qmp.cancel_commands(keep=self)
            async with self.daemon.monitor_lock:
                result = await cmd.handler(Context(self.daemon, self), parsed)
        except QmpError as exc:
            log.info("qmp#%d %s: %s", self.num, name, exc.desc)
            return fail(exc.desc, exc.qmp_class)
        except OSError as exc:
            # An I/O error inside a command: report it the way QEMU's error_setg_errno does.
            log.warning("qmp#%d %s: %s", self.num, name, exc)
            return fail(exc.strerror or str(exc))
        except Exception as exc:  # a bug: answer with the id so clients stay in sync
            log.exception("qmp#%d %s: internal error", self.num, name)
            return fail(f"Internal error in {name}: {type(exc).__name__}: {exc}")
        reply: dict[str, Any] = {"return": _wire(result)}
        if has_id:
            reply["id"] = rid
        return reply

    def negotiated(self, oob: bool) -> None:
        self.oob = oob
        self.state = Runstate.COMMAND

    def quit_after_reply(self) -> None:
        self._quit_after_reply = True


_EOF = object()


def _wire(result: Any) -> Any:
    if result is None:
        return {}
    dump = getattr(result, "wire", None)
    if dump is not None:
        return dump()
    if isinstance(result, list):
        return [_wire(r) for r in result]
    return result


def _error(cls: str, desc: str, rid: Any = None, has_id: bool = False) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": cls, "desc": desc}}
    if has_id:
        reply["id"] = rid
    return reply
