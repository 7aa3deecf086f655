"""The NBD server: listener, per-connection handshake and transmission (QEMU's nbd/server.c and
blockdev-nbd.c), and the registry of block exports (QEMU's block/export/export.c).

Layering: :class:`NbdService` (one per daemon, ``daemon.services["nbd"]``) owns the exports
by id and at most one :class:`NbdServer` (the listening sockets). The server owns
:class:`NbdConnection` objects; each runs the fixed-newstyle option haggling and then the
transmission phase against one :class:`~blockd.nbd.export.NbdExport`.

Concurrency in the transmission phase: one reader loop per connection parses a request,
reads its payload and immediately creates the task serving it, in arrival order and without
awaiting in between. Tasks start in creation order and register with the node's request
tracker before their first await, so overlapping writes keep their order while everything
else runs concurrently and replies go out as they complete. The reader stops reading while
the connection's budget (requests and buffered bytes in flight) is spent, which bounds the
memory one client can pin.

A client that disappears does not cancel anything: requests already handed to the node
complete (their replies are dropped), so the image never sees half a request. Closing a
connection from QMP aborts the socket; nothing on the monitor path waits on a peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from blockd.block.driver import WriteFlags
from blockd.block.status import BlockStatus
from blockd.errors import QmpError, errno_of
from blockd.nbd import protocol as P
from blockd.nbd.export import NbdExport

log = logging.getLogger(__name__)

#: Requests served at once per connection (QEMU: MAX_NBD_REQUESTS).
MAX_REQUESTS = 16
#: Payload and reply bytes buffered at once per connection (one request may always run).
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
#: Longest option payload accepted in the handshake; longer ones end the connection.
MAX_OPTION_LENGTH = 64 * 1024
#: A client has this long to finish the handshake (QEMU 7.2 waits forever; a stuck peer
#: would otherwise hold one of max-connections slots for good).
HANDSHAKE_TIMEOUT = 60.0

#: Kernel socket buffer size asked for each connection (capped by net.core.*mem_max).
SOCKET_BUFFER = 4 * 1024 * 1024

_conn_ids = itertools.count(1)


class NbdConnection:
    """One client: handshake, then requests until disconnect or :meth:`close`."""

    def __init__(
        self, server: NbdServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.num = next(_conn_ids)
        self.log = logging.LoggerAdapter(log, {"conn": self.num})
        self.export: NbdExport | None = None
        self.structured = False
        self.fixed = True
        self.no_zeroes = False
        #: Selected metadata contexts (id, name) and the export they were selected for.
        self.meta: list[tuple[int, str]] = []
        self.meta_export: NbdExport | None = None
        #: Alignment the client agreed to through NBD_INFO_BLOCK_SIZE (0: none).
        self.check_align = 0
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight_bytes = 0
        self._wakeup = asyncio.Event()
        self.finished = asyncio.Event()

    def __repr__(self) -> str:
        return f"<NbdConnection {self.num} export={self.export.name if self.export else None}>"

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the connection now; requests already running finish against the node."""
        if not self.closed:
            self.closed = True
            self.writer.transport.abort()
            self._wakeup.set()

    async def run(self) -> None:
        try:
            try:
                export = await asyncio.wait_for(self._handshake(), HANDSHAKE_TIMEOUT)
                if export is not None:
                    await self._transmission()
            except P.ProtocolError as exc:
                log.info("nbd#%d: protocol error: %s", self.num, exc)
            except TimeoutError:
                log.info("nbd#%d: handshake timed out", self.num)
            except (asyncio.IncompleteReadError, ConnectionError, OSError):
                log.debug("nbd#%d: peer went away", self.num)
            except Exception:
                log.exception("nbd#%d: internal error", self.num)
        finally:
            # Never cancel requests in flight: let the node finish them.
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            if not self.closed:
                # Orderly end (EOF, NBD_CMD_DISC, protocol error): queued replies still go
                # out before the socket closes; close() from QMP aborts instead.
                self.closed = True
                self.writer.close()
                # ... but a peer that never reads them does not keep the socket forever.
                asyncio.get_running_loop().call_later(10.0, self.writer.transport.abort)
            if self.export is not None:
                self.export.connections.discard(self)
                self.server.service.connection_gone(self.export)
            self.finished.set()
            log.info("nbd#%d: closed", self.num)

    # -- output ----------------------------------------------------------------------------
    def _write(self, *parts: bytes | bytearray | memoryview) -> None:
        """Queue *parts* back to back (no await in between, so nothing interleaves)."""
        if self.closed:
            return
        for p in parts:
            self.writer.write(p)

    async def _drain(self) -> None:
        if self.closed:
            return
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            self.close()

    # -- handshake -------------------------------------------------------------------------
    async def _read(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    def _reply(self, opt: int, rtype: int, payload: bytes = b"") -> None:
        self._write(P.option_reply(opt, rtype, payload))

    def _error(self, opt: int, rtype: int, message: str) -> None:
        self.log.debug("option %d refused: %s", opt, message)
        self._reply(opt, rtype, message.encode())

    async def _handshake(self) -> NbdExport | None:
        """Fixed-newstyle negotiation; returns the export to serve, or None to hang up."""
        self._write(
            P.U64.pack(P.NBDMAGIC)
            + P.U64.pack(P.IHAVEOPT)
            + P.U16.pack(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
        )
        await self._drain()
        (cflags,) = P.U32.unpack(await self._read(4))
        if cflags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            raise P.ProtocolError(f"unknown client flags {cflags:#x}")
        self.fixed = bool(cflags & P.FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = P.OPTION_HEADER.unpack(await self._read(P.OPTION_HEADER.size))
            if magic != P.IHAVEOPT:
                raise P.ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise P.ProtocolError(f"option {opt} too long ({length} bytes)")
            data = await self._read(length) if length else b""
            if self.closed:
                return None
            if not self.fixed and opt != P.OPT_EXPORT_NAME:
                raise P.ProtocolError(f"option {opt} without fixed newstyle")
            if opt == P.OPT_EXPORT_NAME:
                return self._opt_export_name(data)
            if opt == P.OPT_ABORT:
                self._reply(opt, P.REP_ACK)
                await self._drain()
                return None
            if opt == P.OPT_LIST:
                self._opt_list(data)
            elif opt in (P.OPT_INFO, P.OPT_GO):
                export = self._opt_info_go(opt, data)
                if export is not None:
                    await self._drain()
                    return export
            elif opt == P.OPT_STRUCTURED_REPLY:
                if data:
                    self._error(opt, P.REP_ERR_INVALID, "option 'structured reply' has a payload")
                elif self.structured:
                    self._error(opt, P.REP_ERR_INVALID, "structured reply already negotiated")
                else:
                    self.structured = True
                    self._reply(opt, P.REP_ACK)
            elif opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
                self._opt_meta_context(opt, data)
            elif opt == P.OPT_STARTTLS:
                self._error(opt, P.REP_ERR_POLICY, "TLS not configured")
            else:
                self._error(opt, P.REP_ERR_UNSUP, f"Unsupported option {opt}")
            await self._drain()

    def _find_export(self, opt: int, raw: bytes) -> NbdExport | None:
        """The export named *raw*; when there is none, refuse *opt* with QEMU's text (for
        NBD_OPT_EXPORT_NAME, which has no error reply, the caller hangs up instead)."""
        name = raw.decode("utf-8", "replace")
        export = self.server.service.export_by_name(name)
        if export is None and opt != P.OPT_EXPORT_NAME:
            self._error(opt, P.REP_ERR_UNKNOWN, f"export '{name}' not present")
        return export

    def _enter(self, export: NbdExport) -> NbdExport | None:
        if export.shutting_down or self.closed:
            return None
        self.export = export
        export.connections.add(self)
        if self.meta_export is not export:
            self.meta = []
        self.log.info("nbd#%d: serving export '%s'", self.num, export.name)
        return export

    def _opt_export_name(self, data: bytes) -> NbdExport | None:
        export = self._find_export(P.OPT_EXPORT_NAME, data)
        if export is None:
            raise P.ProtocolError(f"export {data[:100]!r} not present")
        flags = export.transmission_flags(self.structured)
        self._write(P.U64.pack(export.size) + P.U16.pack(flags))
        if not self.no_zeroes:
            self._write(bytes(124))
        return self._enter(export)

    def _opt_list(self, data: bytes) -> None:
        if data:
            self._error(P.OPT_LIST, P.REP_ERR_INVALID, "no payload expected in option 'list'")
            return
        for exp in self.server.service.nbd_exports():
            name = exp.name.encode()
            desc = (exp.description or "").encode()
            self._reply(P.OPT_LIST, P.REP_SERVER, P.U32.pack(len(name)) + name + desc)
        self._reply(P.OPT_LIST, P.REP_ACK)

    def _opt_info_go(self, opt: int, data: bytes) -> NbdExport | None:
        if len(data) < 6:
            self._error(opt, P.REP_ERR_INVALID, "option payload too short")
            return None
        (namelen,) = P.U32.unpack_from(data, 0)
        if namelen > P.MAX_STRING_SIZE or 4 + namelen + 2 > len(data):
            self._error(opt, P.REP_ERR_INVALID, "bad length received")
            return None
        name = data[4 : 4 + namelen]
        (nreq,) = P.U16.unpack_from(data, 4 + namelen)
        if 4 + namelen + 2 + 2 * nreq != len(data):
            self._error(opt, P.REP_ERR_INVALID, "bad length received")
            return None
        requests = {P.U16.unpack_from(data, 6 + namelen + 2 * i)[0] for i in range(nreq)}
        export = self._find_export(opt, name)
        if export is None:
            return None
        if P.INFO_NAME in requests:
            self._reply(opt, P.REP_INFO, P.U16.pack(P.INFO_NAME) + export.name.encode())
        if P.INFO_DESCRIPTION in requests and export.description:
            self._reply(
                opt, P.REP_INFO, P.U16.pack(P.INFO_DESCRIPTION) + export.description.encode()
            )
        want_bs = P.INFO_BLOCK_SIZE in requests
        align = export.node.driver.limits.request_alignment or 1
        min_bs = align if (opt == P.OPT_INFO or want_bs) else 1
        max_t = export.node.driver.limits.max_transfer or P.MAX_BUFFER_SIZE
        self._reply(
            opt,
            P.REP_INFO,
            P.BLOCK_SIZE_INFO.pack(
                P.INFO_BLOCK_SIZE, min_bs, max(4096, min_bs), min(max_t, P.MAX_BUFFER_SIZE)
            ),
        )
        flags = export.transmission_flags(self.structured)
        self._reply(opt, P.REP_INFO, P.EXPORT_INFO.pack(P.INFO_EXPORT, export.size, flags))
        if opt == P.OPT_GO and not want_bs and align > 1:
            self._error(
                opt, P.REP_ERR_BLOCK_SIZE_REQD, "request NBD_INFO_BLOCK_SIZE to use this export"
            )
            return None
        self._reply(opt, P.REP_ACK)
        if opt == P.OPT_GO:
            self.check_align = align if want_bs and align > 1 else 0
            return self._enter(export)
        return None

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        is_set = opt == P.OPT_SET_META_CONTEXT
        if is_set and not self.structured:
            self._error(
                opt,
                P.REP_ERR_INVALID,
                "request option 'set meta context' when structured reply is not negotiated",
            )
            return
        try:
            pos = 0
            (namelen,) = P.U32.unpack_from(data, pos)
            pos += 4
            if namelen > P.MAX_STRING_SIZE or pos + namelen + 4 > len(data):
                raise ValueError
            name = data[pos : pos + namelen]
            pos += namelen
            (nq,) = P.U32.unpack_from(data, pos)
            pos += 4
            queries: list[str] = []
            for _ in range(nq):
                (qlen,) = P.U32.unpack_from(data, pos)
                pos += 4
                if qlen > P.MAX_STRING_SIZE or pos + qlen > len(data):
                    raise ValueError
                queries.append(data[pos : pos + qlen].decode("utf-8", "replace"))
                pos += qlen
            if pos != len(data):
                raise ValueError
        except (ValueError, struct.error):
            self._error(opt, P.REP_ERR_INVALID, "bad length received")
            return
        export = self._find_export(opt, name)
        if export is None:
            return
        offered = export.contexts()
        chosen: list[int] = []
        if not queries and not is_set:
            chosen = list(range(len(offered)))
        for q in queries:
            for i, ctx in enumerate(offered):
                if i in chosen:
                    continue
                if ctx == q or (not is_set and _list_match(q, ctx)):
                    chosen.append(i)
        chosen.sort()
        if is_set:
            self.meta = [(i, offered[i]) for i in chosen]
            self.meta_export = export
        for i in chosen:
            # Ids only mean something for SET; LIST answers 0 (as QEMU and the spec allow).
            cid = i if is_set else 0
            self._reply(opt, P.REP_META_CONTEXT, P.U32.pack(cid) + offered[i].encode())
        self._reply(opt, P.REP_ACK)

    # -- transmission ----------------------------------------------------------------------
    async def _transmission(self) -> None:
        assert self.export is not None
        readexactly = self.reader.readexactly
        unpack = P.REQUEST.unpack
        hdr_size = P.REQUEST.size
        while not self.closed:
            magic, flags, rtype, handle, offset, length = unpack(await readexactly(hdr_size))
            if magic != P.REQUEST_MAGIC:
                raise P.ProtocolError(f"bad request magic {magic:#x}")
            req = P.Request(flags, rtype, handle, offset, length)
            if rtype == P.CMD_DISC:
                self.log.debug("nbd#%d: disconnect requested", self.num)
                return
            cost = length if rtype == P.CMD_READ or rtype == P.CMD_WRITE else 0
            if cost > P.MAX_BUFFER_SIZE:
                self._simple_or_error(req, P.NBD_EINVAL, f"len ({length}) is larger than max len")
                await self._drain()
                if rtype == P.CMD_WRITE:
                    raise P.ProtocolError("write payload too large to skip")
                continue
            await self._wait_budget(cost)
            if self.closed:
                return
            payload = await readexactly(length) if rtype == P.CMD_WRITE and length else b""
            # No await between here and the task's creation: arrival order is kept.
            self._inflight_bytes += cost
            self._tasks.add(asyncio.create_task(self._serve(req, payload, cost)))

    async def _wait_budget(self, cost: int) -> None:
        """Wait until the request costing *cost* fits in the connection's budget (one request
        always fits)."""
        while (
            not self.closed
            and self._tasks
            and (
                len(self._tasks) >= MAX_REQUESTS or self._inflight_bytes + cost > MAX_INFLIGHT_BYTES
            )
        ):
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _serve(self, req: P.Request, payload: bytes, cost: int) -> None:
        try:
            try:
                await self._dispatch(req, payload)
            except Exception:
                # A bug must not leave the client waiting forever: answer EIO.
                log.exception("nbd#%d: internal error serving %s", self.num, req)
                self._simple_or_error(req, P.NBD_EIO, "internal error")
            await self._drain()
        except Exception:
            log.exception("nbd#%d: request %s failed", self.num, req)
        finally:
            self._inflight_bytes -= cost
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)
            self._wakeup.set()

    def _simple_or_error(self, req: P.Request, err: int, msg: str = "") -> None:
        """The reply to a command other than READ/BLOCK_STATUS, or any error (QEMU's
        nbd_send_generic_reply): structured error chunk if negotiated, else simple reply."""
        if err and self.structured:
            self._write(P.error_chunk(req.handle, err, msg))
        else:
            self._write(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, err, req.handle))

    def _os_error(self, req: P.Request, exc: OSError) -> None:
        self._simple_or_error(req, P.errno_to_nbd(errno_of(exc)), exc.strerror or str(exc))

    def _check(self, req: P.Request) -> tuple[int, str]:
        """Validate a request; (nbd error, message) or (0, "")."""
        export = self.export
        assert export is not None
        valid = P.CMD_FLAG_FUA
        if req.type == P.CMD_READ and self.structured:
            valid |= P.CMD_FLAG_DF
        elif req.type == P.CMD_WRITE_ZEROES:
            valid |= P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO
        elif req.type == P.CMD_BLOCK_STATUS:
            valid |= P.CMD_FLAG_REQ_ONE
        if req.flags & ~valid:
            return P.NBD_EINVAL, f"unsupported flags (got {req.flags:#x})"
        if req.type not in P.CMD_NAMES:
            return P.NBD_EINVAL, f"invalid request type ({req.type}) received"
        # QSD 7.2 answers EINVAL to both of the next two; the spec says EPERM for writes to
        # a read-only export and ENOSPC for writes past the end, and blockd follows the spec
        # (the messages are QEMU's).
        if not export.writable and req.type in (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM):
            return P.NBD_EPERM, "Export is read-only"
        if req.offset > export.size or req.length > export.size - req.offset:
            err = P.NBD_ENOSPC if req.type in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.NBD_EINVAL
            return err, (
                f"operation past EOF; From: {req.offset}, Len: {req.length}, Size: {export.size}"
            )
        if (
            self.check_align
            and req.type != P.CMD_FLUSH
            and (req.offset % self.check_align or req.length % self.check_align)
        ):
            return P.NBD_EINVAL, "request not aligned to the minimum block size"
        return 0, ""

    async def _dispatch(self, req: P.Request, payload: bytes) -> None:
        export = self.export
        assert export is not None
        err, msg = self._check(req)
        if err:
            self._simple_or_error(req, err, msg)
            return
        # Note: the node call must come before any other await (ordering of writes).
        try:
            t = req.type
            if t == P.CMD_READ:
                await self._do_read(req)
                return
            if t == P.CMD_BLOCK_STATUS:
                await self._do_block_status(req)
                return
            node = export.node
            fua = bool(req.flags & P.CMD_FLAG_FUA) or export.writethrough
            if t == P.CMD_WRITE:
                await node.write(req.offset, payload, WriteFlags.FUA if fua else WriteFlags.NONE)
            elif t == P.CMD_WRITE_ZEROES:
                wflags = WriteFlags.NONE
                if not req.flags & P.CMD_FLAG_NO_HOLE:
                    wflags |= WriteFlags.MAY_UNMAP
                if req.flags & P.CMD_FLAG_FAST_ZERO:
                    wflags |= WriteFlags.NO_FALLBACK
                if fua:
                    wflags |= WriteFlags.FUA
                await node.write_zeroes(req.offset, req.length, wflags)
            elif t == P.CMD_TRIM:
                await node.discard(req.offset, req.length)
                if fua:
                    await node.flush()
            elif t == P.CMD_FLUSH:
                await node.flush()
            elif t == P.CMD_CACHE and req.length:
                await node.read(req.offset, req.length)  # warms the cache; data dropped
            self._simple_or_error(req, 0)
        except OSError as exc:
            self._os_error(req, exc)

    async def _do_read(self, req: P.Request) -> None:
        export = self.export
        assert export is not None
        node = export.node
        if req.length == 0:
            if self.structured:
                self._write(P.chunk(P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, req.handle, 0))
            else:
                self._simple_or_error(req, 0)
            return
        if not self.structured or req.flags & P.CMD_FLAG_DF:
            try:
                data = await node.read(req.offset, req.length)
            except OSError as exc:
                self._os_error(req, exc)
                return
            if self.structured:
                self._write(
                    P.data_chunk_header(P.REPLY_FLAG_DONE, req.handle, req.offset, len(data)), data
                )
            else:
                self._write(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, req.handle), data)
            return
        # Sparse read: holes as OFFSET_HOLE chunks, data as OFFSET_DATA chunks (QEMU's
        # nbd_co_send_sparse_read). The data is read in one request *while* the block status
        # is asked, so a read costs one round trip to the I/O pool instead of two; reading
        # the holes too is cheap (the kernel zero-fills them).
        pos = req.offset
        end = req.offset + req.length
        reading = asyncio.ensure_future(node.read(pos, req.length))
        runs: list[tuple[int, int, bool]] = []  # (offset, length, is_hole)
        while pos < end:
            try:
                ext = await node.block_status_above(pos, end - pos, None)
                n = min(max(ext.length, 0), end - pos)
                hole = bool(ext.flags & BlockStatus.ZERO)
            except OSError:
                n, hole = end - pos, False
            if n <= 0:
                n, hole = end - pos, False
            if runs and runs[-1][2] == hole:
                runs[-1] = (runs[-1][0], runs[-1][1] + n, hole)
            else:
                runs.append((pos, n, hole))
            pos += n
        try:
            data = memoryview(await reading).cast("B")
        except OSError as exc:
            if any(not hole for _o, _n, hole in runs):
                self._os_error(req, exc)
                return
            data = memoryview(b"")
        out: list[bytes | bytearray | memoryview] = []
        for i, (off, n, hole) in enumerate(runs):
            flags = P.REPLY_FLAG_DONE if i == len(runs) - 1 else 0
            if hole:
                out.append(P.hole_chunk(flags, req.handle, off, n))
            else:
                out.append(P.data_chunk_header(flags, req.handle, off, n))
                out.append(data[off - req.offset : off - req.offset + n])
        self._write(*out)

    async def _do_block_status(self, req: P.Request) -> None:
        export = self.export
        assert export is not None
        if not self.meta:
            self._simple_or_error(req, P.NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated")
            return
        if req.length == 0:
            self._simple_or_error(req, P.NBD_EINVAL, "need non-zero length")
            return
        max_ext = 1 if req.flags & P.CMD_FLAG_REQ_ONE else P.MAX_BLOCK_STATUS_EXTENTS
        out: list[bytes] = []
        try:
            for i, (ctx_id, name) in enumerate(self.meta):
                exts = await export.context_extents(name, req.offset, req.length, max_ext)
                body = P.U32.pack(ctx_id) + b"".join(P.EXTENT.pack(n, f) for n, f in exts)
                flags = P.REPLY_FLAG_DONE if i == len(self.meta) - 1 else 0
                out.append(P.chunk(flags, P.REPLY_TYPE_BLOCK_STATUS, req.handle, len(body)))
                out.append(body)
        except OSError as exc:
            self._os_error(req, exc)
            return
        self._write(b"".join(out))


def _list_match(query: str, ctx: str) -> bool:
    """NBD_OPT_LIST_META_CONTEXT wildcards: a namespace (``base:``, ``qemu:``) or a leaf
    prefix (``qemu:dirty-bitmap:``) lists every context under it."""
    if query in ("base:", "qemu:") or query == P.CONTEXT_DIRTY_BITMAP_PREFIX:
        return ctx.startswith(query)
    return False


# -- listener ------------------------------------------------------------------------------------
class NbdServer:
    """The listening socket(s) of ``nbd-server-start`` and the connections they accepted."""

    def __init__(self, service: NbdService, max_connections: int) -> None:
        self.service = service
        self.max_connections = max_connections
        self.connections: set[NbdConnection] = set()
        self._socks: list[socket.socket] = []
        self._unix_path: str | None = None
        self._accepters: list[asyncio.Task[None]] = []
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._slot = asyncio.Event()

    # -- binding (QEMU's util/qemu-sockets.c texts) -----------------------------------------
    def bind(self, addr: Any) -> None:
        kind = addr.type.value if hasattr(addr.type, "value") else str(addr.type)
        data = addr.data
        if kind == "unix":
            self._bind_unix(data.path, bool(data.abstract), data.tight is not False)
        elif kind == "inet":
            self._bind_inet(data)
        elif kind == "vsock":
            self._bind_vsock(data.cid, data.port)
        else:
            raise QmpError("only QEMU supports file descriptor passing")

    def _bind_unix(self, path: str, abstract: bool, tight: bool) -> None:
        if len(path.encode()) >= 108 - (1 if abstract else 0):
            raise QmpError(f"UNIX socket path '{path}' is too long")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if abstract:
                target: Any = b"\0" + path.encode()
                if not tight:
                    target = target.ljust(108, b"\0")
            else:
                target = path
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            try:
                sock.bind(target)
            except OSError as exc:
                raise QmpError(f"Failed to bind socket to {path}: {exc.strerror}") from None
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        if not abstract:
            self._unix_path = path
        self._socks.append(sock)

    def _bind_inet(self, data: Any) -> None:
        host, port = data.host, data.port
        family = socket.AF_UNSPEC
        if data.ipv4 and not data.ipv6:
            family = socket.AF_INET
        elif data.ipv6 and not data.ipv4:
            family = socket.AF_INET6
        try:
            infos = socket.getaddrinfo(
                host or None, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
            )
        except socket.gaierror as exc:
            raise QmpError(f"address resolution failed for {host}:{port}: {exc.strerror}") from None
        last: OSError | None = None
        for fam, stype, proto, _canon, sa in infos:
            sock = socket.socket(fam, stype, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sa)
                sock.listen(128)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            self._socks.append(sock)
            return
        reason = last.strerror if last is not None else "no address"
        raise QmpError(f"Failed to find an available port: {reason}")

    def _bind_vsock(self, cid: str, port: str) -> None:
        fam = getattr(socket, "AF_VSOCK", None)
        if fam is None:
            raise QmpError("Failed to bind socket: Address family not supported by protocol")
        try:
            sock = socket.socket(fam, socket.SOCK_STREAM)
        except OSError as exc:
            raise QmpError(f"Failed to create socket: {exc.strerror}") from None
        try:
            sock.bind((int(cid), int(port)))
            sock.listen(128)
        except (OSError, ValueError) as exc:
            sock.close()
            reason = exc.strerror if isinstance(exc, OSError) else "Invalid argument"
            raise QmpError(f"Failed to bind socket: {reason}") from None
        self._socks.append(sock)

    def address(self) -> Any:
        """The first listening address (tests use it to find an ephemeral TCP port)."""
        return self._socks[0].getsockname() if self._socks else None

    # -- accepting -------------------------------------------------------------------------
    def start(self) -> None:
        for sock in self._socks:
            sock.setblocking(False)
            self._accepters.append(asyncio.create_task(self._accept_loop(sock)))

    def _full(self) -> bool:
        return 0 < self.max_connections <= len(self.connections)

    async def _accept_loop(self, lsock: socket.socket) -> None:
        """Accept while below max-connections; at the limit stop accepting, like QEMU,
        so further clients wait in the backlog instead of being refused."""
        loop = asyncio.get_running_loop()
        while True:
            while self._full():
                self._slot.clear()
                await self._slot.wait()
            try:
                conn, _peer = await loop.sock_accept(lsock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("nbd: accept failed: %s", exc)
                    await asyncio.sleep(0.1)
                    continue
                raise
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Room for whole 1 MiB+ replies in the kernel: otherwise asyncio copies every
            # partially sent reply into its own buffer, which halves read throughput.
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            reader, writer = await asyncio.open_connection(sock=conn, limit=1024 * 1024)
            c = NbdConnection(self, reader, writer)
            self.connections.add(c)
            t = asyncio.create_task(self._run_conn(c), name=f"nbd#{c.num}")
            self._conn_tasks.add(t)
            t.add_done_callback(self._conn_tasks.discard)

    async def _run_conn(self, c: NbdConnection) -> None:
        log.info("nbd#%d: connected", c.num)
        try:
            await c.run()
        finally:
            self.connections.discard(c)
            self._slot.set()

    async def stop(self) -> None:
        """Stop listening, drop every connection (negotiating ones too) and wait for them."""
        for t in self._accepters:
            t.cancel()
        for t in self._accepters:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._accepters.clear()
        for s in self._socks:
            s.close()
        self._socks.clear()
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
            self._unix_path = None
        for c in list(self.connections):
            c.close()
        if self._conn_tasks:
            await asyncio.gather(*list(self._conn_tasks), return_exceptions=True)


# -- the service: exports by id, the server, deletion ------------------------------------------
class NbdService:
    """Per-daemon NBD state (``daemon.services["nbd"]``): the server and the exports."""

    def __init__(self, emit: Callable[[str, dict[str, Any]], None]) -> None:
        self.emit = emit
        self.server: NbdServer | None = None
        #: Every block export by id, oldest first (QEMU's block_exports list).
        self.exports: dict[str, NbdExport] = {}
        self._deleters: set[asyncio.Task[None]] = set()
        self._stopping = False

    def nbd_exports(self) -> list[NbdExport]:
        """Exports visible to clients, oldest first."""
        return [e for e in self.exports.values() if not e.shutting_down]

    def export_by_name(self, name: str) -> NbdExport | None:
        for e in self.exports.values():
            if e.name == name and not e.shutting_down:
                return e
        return None

    async def start_server(self, addr: Any, max_connections: int) -> NbdServer:
        server = NbdServer(self, max_connections)
        server.bind(addr)
        server.start()
        self.server = server
        return server

    # -- deletion ----------------------------------------------------------------------------
    async def _finish(self, export: NbdExport) -> None:
        if self.exports.get(export.id) is not export:
            return
        await export.release()
        del self.exports[export.id]
        log.info("nbd: export %s deleted", export.id)
        self.emit("BLOCK_EXPORT_DELETED", {"id": export.id})

    async def delete(self, export: NbdExport) -> None:
        """Hard removal: without clients it completes now (event before the QMP reply);
        with clients the connections are dropped and it completes once they are gone."""
        export.request_shutdown()
        if not export.connections:
            await self._finish(export)

    def connection_gone(self, export: NbdExport) -> None:
        if export.shutting_down and not export.connections and not self._stopping:
            t = asyncio.create_task(self._finish(export))
            self._deleters.add(t)
            t.add_done_callback(self._deleters.discard)

    async def stop_server(self) -> None:
        """``nbd-server-stop``: every NBD export goes (oldest first), clients are dropped,
        and the events are sent before returning, as QSD does."""
        server, self.server = self.server, None
        self._stopping = True
        try:
            exports = list(self.exports.values())
            for e in exports:
                e.request_shutdown()
            if server is not None:
                await server.stop()
            if self._deleters:
                await asyncio.gather(*list(self._deleters), return_exceptions=True)
            for e in exports:
                await self._finish(e)
        finally:
            self._stopping = False

    async def shutdown(self) -> None:
        """Daemon exit."""
        await self.stop_server()
