"""The client half of the NBD protocol (QEMU's nbd/client.c and the request multiplexing of
block/nbd.c): connect, fixed-newstyle negotiation, then many requests in flight.

One reader task owns the receive side and completes requests by handle; senders write a whole
request (header and payload) in one go, so nothing interleaves on the wire. Used by the ``nbd``
block driver and by tests that need a well-behaved peer at the protocol level.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from blockd.nbd import protocol as P
from blockd.net.sockets import AddressError, connect_inet, connect_unix

log = logging.getLogger(__name__)

#: Requests in flight per connection (QEMU's MAX_NBD_REQUESTS).
MAX_INFLIGHT = 16
#: How long a disconnect waits for requests in flight before dropping the socket.
DISCONNECT_TIMEOUT = 5.0


class NbdConnectError(Exception):
    """Connecting or negotiating failed; ``str()`` is the QEMU-style text."""


class NbdDisconnected(OSError):
    """The connection went away with the request unanswered."""

    def __init__(self, msg: str = "NBD connection closed") -> None:
        super().__init__(errno.EIO, msg)


@dataclass
class ExportInfo:
    name: str
    size: int = 0
    flags: int = 0
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = P.MAX_BUFFER_SIZE
    description: str | None = None
    structured: bool = False
    #: Negotiated metadata contexts, name -> id.
    contexts: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class _Pending:
    req: P.Request
    future: asyncio.Future[Any]
    buf: bytearray | None = None
    error: OSError | None = None
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)


def _option_error_text(opt: int, rtype: int, msg: str) -> str:
    """QEMU's wording for an option refused by the server (nbd/client.c)."""
    if rtype == P.REP_ERR_UNKNOWN:
        return "Requested export not available"
    base = {
        P.REP_ERR_UNSUP: f"Unsupported option {opt}",
        P.REP_ERR_POLICY: f"Denied by server for option {opt}",
        P.REP_ERR_INVALID: f"Server reported invalid request for option {opt}",
        P.REP_ERR_PLATFORM: f"Server lacks support for option {opt}",
        P.REP_ERR_TLS_REQD: f"TLS negotiation required before option {opt}",
        P.REP_ERR_SHUTDOWN: f"Server shutting down before option {opt}",
        P.REP_ERR_BLOCK_SIZE_REQD: f"Server requires INFO_BLOCK_SIZE for option {opt}",
    }.get(rtype, f"Unknown error code when asking for option {opt}")
    return f"{base}: {msg}" if msg else base


async def open_stream(
    address: tuple[str, ...], timeout: float | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``("unix", path)`` or ``("inet", host, port)``; QEMU's error text."""
    kind = address[0]
    shown = address[1] if kind == "unix" else f"{address[1]}:{address[2]}"
    try:
        if kind == "unix":
            coro = _open(connect_unix(address[1]))
        else:
            coro = _open(connect_inet(address[1], address[2]))
        reader, writer = await asyncio.wait_for(coro, timeout)
    except TimeoutError:
        raise NbdConnectError(f"Failed to connect to '{shown}': Connection timed out") from None
    except socket.gaierror as exc:
        raise NbdConnectError(f"address resolution failed for {shown}: {exc.strerror}") from None
    except AddressError as exc:
        raise NbdConnectError(str(exc)) from None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise NbdConnectError(f"Failed to connect to '{shown}': {reason}") from None
    sock = writer.get_extra_info("socket")
    if sock is not None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Whole requests fit in the kernel buffer: asyncio then never copies them.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    return reader, writer


async def _open(
    connecting: Awaitable[socket.socket],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = await connecting
    try:
        return await asyncio.open_connection(sock=sock, limit=1024 * 1024)
    except BaseException:
        sock.close()
        raise


class NbdClient:
    """One negotiated NBD connection in the transmission phase."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: ExportInfo
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.info = info
        self._handles = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._slots = asyncio.Semaphore(MAX_INFLIGHT)
        self.closed = False
        self.lost = asyncio.Event()
        self._reader_task = asyncio.create_task(self._reader_loop())

    # -- connecting --------------------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        address: tuple[str, ...],
        export: str = "",
        *,
        structured: bool = True,
        contexts: list[str] | None = None,
        timeout: float | None = 30.0,
    ) -> NbdClient:
        """Connect and negotiate. Raises :class:`NbdConnectError` with QEMU's texts."""
        reader, writer = await open_stream(address, timeout)
        try:
            info = await asyncio.wait_for(
                negotiate(reader, writer, export, structured, contexts or []), timeout
            )
        except TimeoutError:
            writer.close()
            raise NbdConnectError("Connection timed out while negotiating") from None
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            writer.close()
            raise NbdConnectError(f"Failed to read initial magic: {exc}") from None
        except NbdConnectError:
            # Say goodbye properly, as QEMU does (NBD_OPT_ABORT), so servers log no error.
            with contextlib.suppress(Exception):
                writer.write(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_ABORT, 0))
                await asyncio.wait_for(writer.drain(), 1.0)
            writer.close()
            raise
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, info)

    # -- requests ----------------------------------------------------------------------------
    async def _request(
        self,
        rtype: int,
        offset: int,
        length: int,
        flags: int = 0,
        payload: bytes | bytearray | memoryview | None = None,
    ) -> _Pending:
        if self.closed:
            raise NbdDisconnected()
        async with self._slots:
            if self.closed:
                raise NbdDisconnected()
            handle = next(self._handles)
            req = P.Request(flags, rtype, handle, offset, length)
            pend = _Pending(req, asyncio.get_running_loop().create_future())
            if rtype == P.CMD_READ:
                pend.buf = bytearray(length)
            self._pending[handle] = pend
            hdr = P.REQUEST.pack(P.REQUEST_MAGIC, flags, rtype, handle, offset, length)
            self.writer.write(hdr)
            if payload is not None and len(payload):
                self.writer.write(payload)
            try:
                await self.writer.drain()
            except (ConnectionError, OSError):
                self._lose("send failed")
            await pend.future
            if pend.error is not None:
                raise pend.error
            return pend

    async def read(self, offset: int, length: int, flags: int = 0) -> bytearray:
        pend = await self._request(P.CMD_READ, offset, length, flags)
        assert pend.buf is not None
        return pend.buf

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, flags: int = 0
    ) -> None:
        await self._request(P.CMD_WRITE, offset, len(data), flags, data)

    async def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        await self._request(P.CMD_WRITE_ZEROES, offset, length, flags)

    async def trim(self, offset: int, length: int, flags: int = 0) -> None:
        await self._request(P.CMD_TRIM, offset, length, flags)

    async def flush(self) -> None:
        await self._request(P.CMD_FLUSH, 0, 0)

    async def cache(self, offset: int, length: int) -> None:
        await self._request(P.CMD_CACHE, offset, length)

    async def block_status(
        self, offset: int, length: int, flags: int = 0
    ) -> dict[int, list[tuple[int, int]]]:
        """Extents per context id: ``{id: [(length, flags), ...]}``."""
        pend = await self._request(P.CMD_BLOCK_STATUS, offset, length, flags)
        return pend.extents

    async def disconnect(self) -> None:
        """Send NBD_CMD_DISC after the requests in flight, then close."""
        if self.closed:
            return

        async def polite() -> None:
            for _ in range(MAX_INFLIGHT):
                await self._slots.acquire()
            self.writer.write(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 0, 0, 0))
            await self.writer.drain()

        # A hung server must not hold up node close (and so daemon exit) forever.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(polite(), DISCONNECT_TIMEOUT)
        await self.close()

    async def close(self) -> None:
        self._lose("closed")
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    # -- receiving ---------------------------------------------------------------------------
    def _lose(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.debug("nbd client: connection lost (%s)", why)
        self.writer.transport.abort()
        for pend in self._pending.values():
            if not pend.future.done():
                pend.error = NbdDisconnected()
                pend.future.set_result(None)
        self._pending.clear()
        self.lost.set()

    async def _reader_loop(self) -> None:
        try:
            while True:
                magic_raw = await self.reader.readexactly(4)
                (magic,) = P.U32.unpack(magic_raw)
                if magic == P.SIMPLE_REPLY_MAGIC:
                    rest = await self.reader.readexactly(12)
                    _m, err, handle = P.SIMPLE_REPLY.unpack(magic_raw + rest)
                    pend = self._take(handle)
                    if err:
                        pend.error = OSError(P.nbd_to_errno(err), f"NBD error {err}")
                    elif pend.req.type == P.CMD_READ and pend.buf is not None:
                        pend.buf[:] = await self.reader.readexactly(pend.req.length)
                    self._finish(pend)
                elif magic == P.STRUCTURED_REPLY_MAGIC:
                    rest = await self.reader.readexactly(P.CHUNK_HEADER.size - 4)
                    _m, flags, ctype, handle, length = P.CHUNK_HEADER.unpack(magic_raw + rest)
                    found = self._pending.get(handle)
                    if found is None:
                        raise P.ProtocolError(f"reply for unknown handle {handle}")
                    pend = found
                    if length > P.MAX_BUFFER_SIZE + 1024 * 1024:
                        raise P.ProtocolError(f"chunk too large ({length})")
                    payload = await self.reader.readexactly(length) if length else b""
                    self._chunk(pend, ctype, payload)
                    if flags & P.REPLY_FLAG_DONE:
                        self._take(handle)
                        self._finish(pend)
                else:
                    raise P.ProtocolError(f"bad reply magic {magic:#x}")
        except asyncio.CancelledError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self._lose("peer closed")
        except P.ProtocolError as exc:
            log.warning("nbd client: %s", exc)
            self._lose(str(exc))
        except Exception:
            log.exception("nbd client: reader failed")
            self._lose("internal error")

    def _take(self, handle: int) -> _Pending:
        pend = self._pending.pop(handle, None)
        if pend is None:
            raise P.ProtocolError(f"reply for unknown handle {handle}")
        return pend

    @staticmethod
    def _finish(pend: _Pending) -> None:
        if not pend.future.done():
            pend.future.set_result(None)

    def _chunk(self, pend: _Pending, ctype: int, payload: bytes) -> None:
        req = pend.req
        if ctype == P.REPLY_TYPE_NONE:
            return
        if ctype in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET):
            if len(payload) < 6:
                raise P.ProtocolError("short error chunk")
            (err,) = P.U32.unpack_from(payload, 0)
            (mlen,) = P.U16.unpack_from(payload, 4)
            msg = payload[6 : 6 + mlen].decode("utf-8", "replace")
            if pend.error is None:
                pend.error = OSError(P.nbd_to_errno(err), msg or f"NBD error {err}")
            return
        if ctype == P.REPLY_TYPE_OFFSET_DATA and req.type == P.CMD_READ:
            (off,) = P.U64.unpack_from(payload, 0)
            n = len(payload) - 8
            if off < req.offset or off + n > req.offset + req.length or n <= 0:
                raise P.ProtocolError("data chunk outside the request")
            assert pend.buf is not None
            pend.buf[off - req.offset : off - req.offset + n] = memoryview(payload)[8:]
            return
        if ctype == P.REPLY_TYPE_OFFSET_HOLE and req.type == P.CMD_READ:
            off, n = struct_hole(payload)
            if off < req.offset or off + n > req.offset + req.length:
                raise P.ProtocolError("hole chunk outside the request")
            assert pend.buf is not None
            pend.buf[off - req.offset : off - req.offset + n] = bytes(n)
            return
        if ctype == P.REPLY_TYPE_BLOCK_STATUS and req.type == P.CMD_BLOCK_STATUS:
            if len(payload) < 12 or (len(payload) - 4) % 8:
                raise P.ProtocolError("bad block status chunk")
            (ctx,) = P.U32.unpack_from(payload, 0)
            pend.extents[ctx] = [
                P.EXTENT.unpack_from(payload, 4 + 8 * i) for i in range((len(payload) - 4) // 8)
            ]
            return
        raise P.ProtocolError(f"unexpected chunk type {ctype} for command {req.type}")


def struct_hole(payload: bytes) -> tuple[int, int]:
    if len(payload) != 12:
        raise P.ProtocolError("bad hole chunk")
    (off,) = P.U64.unpack_from(payload, 0)
    (n,) = P.U32.unpack_from(payload, 8)
    return off, n


# -- negotiation -----------------------------------------------------------------------------
async def _send_option(writer: asyncio.StreamWriter, opt: int, data: bytes = b"") -> None:
    writer.write(P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data)
    await writer.drain()


async def _read_option_reply(reader: asyncio.StreamReader, opt: int) -> tuple[int, bytes]:
    magic, ropt, rtype, length = P.OPTION_REPLY_HEADER.unpack(
        await reader.readexactly(P.OPTION_REPLY_HEADER.size)
    )
    if magic != P.OPT_REPLY_MAGIC:
        raise NbdConnectError(f"Unexpected option reply magic {magic:#x}")
    if ropt != opt:
        raise NbdConnectError(f"Unexpected option type {ropt}, expected {opt}")
    if length > 64 * 1024 * 1024:
        raise NbdConnectError("Option reply too large")
    data = await reader.readexactly(length) if length else b""
    return rtype, data


async def negotiate(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    export: str,
    structured: bool,
    contexts: list[str],
) -> ExportInfo:
    """Fixed-newstyle: STRUCTURED_REPLY, SET_META_CONTEXT, GO (EXPORT_NAME as fallback)."""
    (magic,) = P.U64.unpack(await reader.readexactly(8))
    if magic != P.NBDMAGIC:
        raise NbdConnectError("Invalid magic received")
    (magic,) = P.U64.unpack(await reader.readexactly(8))
    if magic == P.CLISERV_MAGIC:
        raise NbdConnectError("Server using oldstyle negotiation, which blockd does not support")
    if magic != P.IHAVEOPT:
        raise NbdConnectError("Bad server magic received")
    (gflags,) = P.U16.unpack(await reader.readexactly(2))
    if not gflags & P.FLAG_FIXED_NEWSTYLE:
        raise NbdConnectError("Server does not support fixed newstyle negotiation")
    cflags = P.FLAG_C_FIXED_NEWSTYLE | (gflags & P.FLAG_NO_ZEROES)
    writer.write(P.U32.pack(cflags))
    info = ExportInfo(export)
    name = export.encode()

    if structured:
        await _send_option(writer, P.OPT_STRUCTURED_REPLY)
        rtype, data = await _read_option_reply(reader, P.OPT_STRUCTURED_REPLY)
        info.structured = rtype == P.REP_ACK
    if info.structured and contexts:
        body = P.U32.pack(len(name)) + name + P.U32.pack(len(contexts))
        for c in contexts:
            cb = c.encode()
            body += P.U32.pack(len(cb)) + cb
        await _send_option(writer, P.OPT_SET_META_CONTEXT, body)
        while True:
            rtype, data = await _read_option_reply(reader, P.OPT_SET_META_CONTEXT)
            if rtype == P.REP_META_CONTEXT and len(data) >= 4:
                (cid,) = P.U32.unpack_from(data, 0)
                info.contexts[data[4:].decode("utf-8", "replace")] = cid
                continue
            if rtype == P.REP_ERR_UNKNOWN:
                raise NbdConnectError("Requested export not available")
            break
    body = P.U32.pack(len(name)) + name + P.U16.pack(1) + P.U16.pack(P.INFO_BLOCK_SIZE)
    await _send_option(writer, P.OPT_GO, body)
    while True:
        rtype, data = await _read_option_reply(reader, P.OPT_GO)
        if rtype == P.REP_INFO and len(data) >= 2:
            (itype,) = P.U16.unpack_from(data, 0)
            if itype == P.INFO_EXPORT and len(data) >= P.EXPORT_INFO.size:
                _t, info.size, info.flags = P.EXPORT_INFO.unpack_from(data, 0)
            elif itype == P.INFO_BLOCK_SIZE and len(data) >= P.BLOCK_SIZE_INFO.size:
                _t, info.min_block, info.pref_block, info.max_block = P.BLOCK_SIZE_INFO.unpack_from(
                    data, 0
                )
            elif itype == P.INFO_DESCRIPTION:
                info.description = data[2:].decode("utf-8", "replace")
            continue
        if rtype == P.REP_ACK:
            return info
        if rtype == P.REP_ERR_UNSUP:
            break  # old server: fall back to EXPORT_NAME
        raise NbdConnectError(_option_error_text(P.OPT_GO, rtype, data.decode("utf-8", "replace")))
    await _send_option(writer, P.OPT_EXPORT_NAME, name)
    try:
        raw = await reader.readexactly(10)
    except asyncio.IncompleteReadError:
        raise NbdConnectError("Requested export not available") from None
    info.size, info.flags = P.U64.unpack_from(raw, 0)[0], P.U16.unpack_from(raw, 8)[0]
    if not gflags & P.FLAG_NO_ZEROES:
        await reader.readexactly(124)
    info.contexts = {}
    return info
