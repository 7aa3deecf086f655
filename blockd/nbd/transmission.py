"""One NBD connection: its lifecycle and the transmission phase (QEMU's nbd/server.c after
the handshake).

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
import itertools
import logging
import time
from typing import TYPE_CHECKING

from blockd.block.driver import WriteFlags
from blockd.block.node import BlockUser
from blockd.block.status import BlockStatus
from blockd.errors import errno_of
from blockd.io import heap
from blockd.nbd import protocol as P
from blockd.nbd.export import NbdExport
from blockd.nbd.handshake import Handshake

if TYPE_CHECKING:
    from blockd.nbd.service import NbdServer

log = logging.getLogger(__name__)

#: Requests served at once per connection (QEMU: MAX_NBD_REQUESTS).
MAX_REQUESTS = 16
#: Payload and reply bytes buffered at once per connection (one request may always run).
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
#: Payload and reply bytes buffered at once by all connections of a server together: what
#: bounds memory when many clients send large requests or never read their replies.
TOTAL_INFLIGHT_BYTES = 128 * 1024 * 1024
#: A client has this long to finish the handshake (QEMU 7.2 waits forever, QEMU 8.2 gives
#: ten seconds: a stuck peer would otherwise hold one of max-connections slots for good) ...
HANDSHAKE_TIMEOUT = 10.0
#: A client whose replies have not moved for this long, while another connection waits for
#: the shared budget, is dropped: its unread replies are what the other one waits for.
STALL_TIMEOUT = 2.0
#: A budget that held this much and runs empty again gives the freed heap back.
TRIM_AFTER = 32 * 1024 * 1024
#: Reads for NBD_CMD_CACHE go to the node in pieces of this size, so a prefetch holds at
#: most one piece in memory.
CACHE_CHUNK = 4 * 1024 * 1024

_conn_ids = itertools.count(1)


class MemoryBudget:
    """Bytes of request payloads and replies held in memory by a server's connections.

    When it runs empty after a burst of at least :data:`TRIM_AFTER` bytes, the freed heap is
    given back to the system (:mod:`blockd.io.heap`), so that RSS follows the budget."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._changed = asyncio.Event()
        self._burst = 0
        self._trims: set[asyncio.Task[None]] = set()

    def fits(self, cost: int) -> bool:
        return cost == 0 or self.used + cost <= self.total

    def take(self, cost: int) -> None:
        self.used += cost
        self._burst = max(self._burst, self.used)

    def give(self, cost: int) -> None:
        if cost:
            self.used -= cost
            self._changed.set()
            if self.used == 0 and self._burst >= TRIM_AFTER:
                self._burst = 0
                t = asyncio.get_running_loop().create_task(heap.trim())
                self._trims.add(t)
                t.add_done_callback(self._trims.discard)

    async def wait_change(self, timeout: float) -> None:
        """Until bytes are given back, or *timeout* seconds."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass


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
        #: What the handshake agreed on (copied from it once it picked an export).
        self.structured = False
        self.meta: list[tuple[int, str]] = []
        self.check_align = 0
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight_bytes = 0
        self._wakeup = asyncio.Event()
        self.finished = asyncio.Event()
        #: When the handshake started (None once an export is being served).
        self.negotiating_since: float | None = time.monotonic()
        #: Since when replies wait for the client to read (None while output flows), and
        #: how many bytes were queued at the last look (see :meth:`output_stalled_since`).
        self.stalled_since: float | None = None
        self._seen_queued = 0

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
                hs = Handshake(self)
                export = await asyncio.wait_for(hs.run(), HANDSHAKE_TIMEOUT)
                self.negotiating_since = None
                if export is not None:
                    self.structured = hs.structured
                    self.meta = hs.meta
                    self.check_align = hs.check_align
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
    def write(self, *parts: bytes | bytearray | memoryview) -> None:
        """Queue *parts* back to back (no await in between, so nothing interleaves)."""
        if self.closed:
            return
        for p in parts:
            # asyncio slices what the socket did not take before buffering it: a memoryview
            # slice is free, a bytes slice would be one more copy of a large reply.
            self.writer.write(memoryview(p) if len(p) > 65536 else p)

    async def drain(self) -> None:
        if self.closed:
            return
        if self.stalled_since is None:
            self.stalled_since = time.monotonic()
            self._seen_queued = self.writer.transport.get_write_buffer_size()
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            self.close()
        finally:
            # Every waiter wakes when the buffer falls below its low-water mark: output moved.
            self.stalled_since = None

    def output_stalled_since(self, now: float) -> float | None:
        """Since when the client has taken none of its queued replies (None when nothing
        waits). Less queued than at the last look counts as progress: a slow reader on a slow
        link is not taken for one that does not read."""
        if self.stalled_since is None or self.closed:
            return None
        queued = self.writer.transport.get_write_buffer_size()
        if queued < self._seen_queued:
            self.stalled_since = now
        self._seen_queued = queued
        return self.stalled_since

    def enter(self, export: NbdExport) -> NbdExport | None:
        """Become a client of *export* (the handshake's last step); None when it is going."""
        if export.shutting_down or self.closed:
            return None
        self.export = export
        export.connections.add(self)
        self.log.info("nbd#%d: serving export '%s'", self.num, export.name)
        return export

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
            sized = rtype == P.CMD_READ or rtype == P.CMD_WRITE or rtype == P.CMD_CACHE
            if sized and length > P.MAX_BUFFER_SIZE:
                self._simple_or_error(
                    req,
                    P.NBD_EINVAL,
                    f"len ({length} ) is larger than max len ({P.MAX_BUFFER_SIZE})",
                )
                await self.drain()
                if rtype == P.CMD_WRITE:
                    raise P.ProtocolError("write payload too large to skip")
                continue
            cost = min(length, CACHE_CHUNK) if rtype == P.CMD_CACHE else length if sized else 0
            await self._wait_budget(cost)
            if self.closed:
                return
            payload = await readexactly(length) if rtype == P.CMD_WRITE and length else b""
            # No await between here and the task's creation: arrival order is kept.
            self._inflight_bytes += cost
            self.server.budget.take(cost)
            self._tasks.add(asyncio.create_task(self._serve(req, payload, cost)))

    async def _wait_budget(self, cost: int) -> None:
        """Wait until the request costing *cost* fits in the connection's budget (one request
        always fits) and in the server's. While waiting for the server's budget, clients that
        do not read their replies are dropped after :data:`STALL_TIMEOUT`, so the bytes they
        pin come free and a client that does read is served."""
        while (
            not self.closed
            and self._tasks
            and (
                len(self._tasks) >= MAX_REQUESTS or self._inflight_bytes + cost > MAX_INFLIGHT_BYTES
            )
        ):
            self._wakeup.clear()
            await self._wakeup.wait()
        budget = self.server.budget
        while not self.closed and not budget.fits(cost):
            self.server.drop_stalled(time.monotonic() - STALL_TIMEOUT)
            await budget.wait_change(STALL_TIMEOUT / 4)

    async def _serve(self, req: P.Request, payload: bytes, cost: int) -> None:
        try:
            try:
                await self._dispatch(req, payload)
            except Exception:
                # A bug must not leave the client waiting forever: answer EIO.
                log.exception("nbd#%d: internal error serving %s", self.num, req)
                self._simple_or_error(req, P.NBD_EIO, "internal error")
            await self.drain()
        except Exception:
            log.exception("nbd#%d: request %s failed", self.num, req)
        finally:
            self._inflight_bytes -= cost
            self.server.budget.give(cost)
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)
            self._wakeup.set()

    def _simple_or_error(self, req: P.Request, err: int, msg: str = "") -> None:
        """The reply to a command other than READ/BLOCK_STATUS, or any error (QEMU's
        nbd_send_generic_reply): structured error chunk if negotiated, else simple reply."""
        if err and self.structured:
            self.write(P.error_chunk(req.handle, err, msg))
        else:
            self.write(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, err, req.handle))

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
            node = await BlockUser.current_node(export.edge)
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
            elif t == P.CMD_CACHE:
                # Warms the caches; the data is dropped piece by piece (the cost counted is
                # one piece).
                end = req.offset + req.length
                for pos in range(req.offset, end, CACHE_CHUNK):
                    await node.read(pos, min(CACHE_CHUNK, end - pos))
            self._simple_or_error(req, 0)
        except OSError as exc:
            self._os_error(req, exc)

    async def _do_read(self, req: P.Request) -> None:
        export = self.export
        assert export is not None
        node = await BlockUser.current_node(export.edge)
        if req.length == 0:
            if self.structured:
                self.write(P.chunk(P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, req.handle, 0))
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
                self.write(
                    P.data_chunk_header(P.REPLY_FLAG_DONE, req.handle, req.offset, len(data)), data
                )
            else:
                self.write(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, req.handle), data)
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
        self.write(*out)

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
        self.write(b"".join(out))
