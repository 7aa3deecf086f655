"""The ``nbd`` protocol driver (QEMU's block/nbd.c): a node whose bytes live behind an NBD
server, plus :func:`parse_nbd_uri` for the URI-style targets of drive-mirror/drive-backup.

Everything is asynchronous: connecting inside ``blockdev-add`` awaits the server without
blocking the event loop, so a node may even connect to this daemon's own export (QSD 7.2
deadlocks there). ``reconnect-delay``: when the connection drops, requests wait up to that
many seconds for a new connection and are then re-sent (QEMU's behaviour); with 0 they fail
at once with EIO. ``open-timeout``: how long ``blockdev-add`` keeps retrying the first
connection (0: one attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from blockd.block.driver import BlockDriver, WriteFlags, register_driver
from blockd.block.status import BlockStatus, Extent
from blockd.errors import QmpError
from blockd.nbd import protocol as P
from blockd.nbd.client import NbdClient, NbdConnectError, NbdDisconnected

log = logging.getLogger(__name__)

T = TypeVar("T")


def _address(server: Any) -> tuple[str, ...]:
    kind = server.type.value if hasattr(server.type, "value") else str(server.type)
    if kind == "unix":
        return ("unix", server.path)
    if kind == "inet":
        return ("inet", server.host, server.port)
    raise QmpError(f"NBD server address type '{kind}' is not supported by blockd")


@register_driver
class NbdDriver(BlockDriver):
    format_name = "nbd"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.client: NbdClient | None = None
        self.address: tuple[str, ...] = ("unix", "")
        self.export = ""
        self.context = P.CONTEXT_BASE_ALLOCATION
        self.reconnect_delay = 0
        self._size = 0
        self._reconnecting: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._lost_at = 0.0
        self._connected = asyncio.Event()
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self, options: Any, graph: Any) -> None:
        if options.tls_creds is not None:
            raise QmpError(f"No TLS credentials with id '{options.tls_creds}'")
        self.address = _address(options.server)
        self.export = options.export or ""
        if options.x_dirty_bitmap is not None:
            self.context = options.x_dirty_bitmap
        self.reconnect_delay = options.reconnect_delay or 0
        deadline = time.monotonic() + (options.open_timeout or 0)
        while True:
            try:
                client = await self._connect()
                break
            except NbdConnectError as exc:
                if time.monotonic() >= deadline:
                    raise QmpError(str(exc)) from None
                await asyncio.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        info = client.info
        if info.flags & P.FLAG_READ_ONLY and not self.node.read_only:
            if self.node.auto_read_only:
                self.node.read_only = True
            else:
                await client.close()
                raise QmpError("Could not open image: Permission denied")
        if options.x_dirty_bitmap is not None and self.context not in info.contexts:
            await client.close()
            log.warning("nbd: requested x-dirty-bitmap %s not found", self.context)
            raise QmpError("Could not open image: Invalid argument")
        self._size = info.size
        self._install(client)
        self.limits.request_alignment = max(1, info.min_block)
        self.limits.max_transfer = min(info.max_block or P.MAX_BUFFER_SIZE, P.MAX_BUFFER_SIZE)
        self.limits.opt_transfer = info.pref_block

    async def _connect(self) -> NbdClient:
        return await NbdClient.connect(
            self.address, self.export, contexts=[self.context], timeout=30.0
        )

    def _install(self, client: NbdClient) -> None:
        self.client = client
        self._connected.set()
        self._watcher = asyncio.create_task(self._watch(client))

    async def _watch(self, client: NbdClient) -> None:
        """Notice a lost connection and, with reconnect-delay, start reconnecting."""
        await client.lost.wait()
        if self._closing or self.client is not client:
            return
        self._connected.clear()
        self._lost_at = time.monotonic()
        log.warning("nbd node %s: connection lost", self.node.node_name)
        if self.reconnect_delay and self._reconnecting is None:
            self._reconnecting = asyncio.create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        try:
            while not self._closing:
                try:
                    client = await self._connect()
                except NbdConnectError as exc:
                    log.debug("nbd node %s: reconnect failed: %s", self.node.node_name, exc)
                    await asyncio.sleep(1.0)
                    continue
                if client.info.size != self._size:
                    log.warning("nbd node %s: export size changed; giving up", self.node.node_name)
                    await client.close()
                    return
                log.info("nbd node %s: reconnected", self.node.node_name)
                self._install(client)
                return
        finally:
            self._reconnecting = None

    async def close(self) -> None:
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reconnecting
        if self.client is not None:
            client, self.client = self.client, None
            await client.disconnect()

    # -- request plumbing ----------------------------------------------------------------------
    async def _current(self) -> NbdClient:
        client = self.client
        if client is not None and not client.closed:
            return client
        if not self.reconnect_delay or self._closing:
            raise OSError(errno.EIO, "NBD connection lost")
        remaining = self.reconnect_delay - (time.monotonic() - self._lost_at)
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), remaining)
        client = self.client
        if client is None or client.closed:
            raise OSError(errno.EIO, "NBD connection lost")
        return client

    async def _call(self, fn: Callable[[NbdClient], Awaitable[T]]) -> T:
        """Run one request; on a dropped connection, retry once reconnected (if allowed)."""
        while True:
            client = await self._current()
            try:
                return await fn(client)
            except NbdDisconnected:
                if not self.reconnect_delay or self._closing:
                    raise
                await asyncio.sleep(0)

    # -- I/O ----------------------------------------------------------------------------------
    def getlength(self) -> int:
        return self._size

    def _flags(self) -> int:
        c = self.client
        return c.info.flags if c is not None else 0

    async def preadv(self, offset: int, nbytes: int) -> bytearray:
        return await self._call(lambda c: c.read(offset, nbytes))

    async def pwritev(self, offset: int, data: memoryview, flags: WriteFlags) -> None:
        fua = bool(flags & WriteFlags.FUA)
        native = fua and bool(self._flags() & P.FLAG_SEND_FUA)
        await self._call(lambda c: c.write(offset, data, P.CMD_FLAG_FUA if native else 0))
        if fua and not native:
            await self.flush()

    async def pwrite_zeroes(self, offset: int, nbytes: int, flags: WriteFlags) -> None:
        sflags = self._flags()
        if not sflags & P.FLAG_SEND_WRITE_ZEROES:
            await super().pwrite_zeroes(offset, nbytes, flags)
            return
        cmd = 0
        if not flags & WriteFlags.MAY_UNMAP:
            cmd |= P.CMD_FLAG_NO_HOLE
        if flags & WriteFlags.NO_FALLBACK:
            if not sflags & P.FLAG_SEND_FAST_ZERO:
                raise OSError(errno.ENOTSUP, "server has no fast zero")
            cmd |= P.CMD_FLAG_FAST_ZERO
        fua = bool(flags & WriteFlags.FUA)
        if fua and sflags & P.FLAG_SEND_FUA:
            cmd |= P.CMD_FLAG_FUA
            fua = False
        await self._call(lambda c: c.write_zeroes(offset, nbytes, cmd))
        if fua:
            await self.flush()

    async def pdiscard(self, offset: int, nbytes: int) -> None:
        if self._flags() & P.FLAG_SEND_TRIM:
            await self._call(lambda c: c.trim(offset, nbytes))

    async def flush(self) -> None:
        if self._flags() & P.FLAG_SEND_FLUSH:
            await self._call(lambda c: c.flush())

    async def block_status(self, offset: int, nbytes: int) -> Extent:
        client = self.client
        if client is None or self.context not in client.info.contexts:
            return await super().block_status(offset, nbytes)
        align = self.limits.request_alignment
        n = min(nbytes, (2**32 - 1) // align * align)
        ctx = client.info.contexts[self.context]
        res = await self._call(lambda c: c.block_status(offset, n, P.CMD_FLAG_REQ_ONE))
        exts = res.get(ctx) or []
        if not exts or exts[0][0] == 0:
            raise OSError(errno.EIO, "server sent no usable extent")
        length, sflags = exts[0]
        flags = BlockStatus.OFFSET_VALID
        if not sflags & P.STATE_HOLE:
            flags |= BlockStatus.DATA
        if sflags & P.STATE_ZERO:
            flags |= BlockStatus.ZERO
        if flags & (BlockStatus.DATA | BlockStatus.ZERO):
            flags |= BlockStatus.ALLOCATED
        return Extent(offset, min(length, nbytes), flags, map_node=self.node, map_offset=offset)

    # -- reporting ----------------------------------------------------------------------------
    def filename(self) -> str:
        """QEMU's nbd_refresh_filename: an nbd URI."""
        if self.address[0] == "unix":
            if self.export:
                return f"nbd+unix:///{self.export}?socket={self.address[1]}"
            return f"nbd+unix://?socket={self.address[1]}"
        host = self.address[1]
        if ":" in host:
            host = f"[{host}]"
        if self.export:
            return f"nbd://{host}:{self.address[2]}/{self.export}"
        return f"nbd://{host}:{self.address[2]}"


# -- URI-style targets ---------------------------------------------------------------------------
def parse_nbd_uri(target: str) -> dict[str, Any]:
    """A ``blockdev-add`` options dict (``driver: nbd``) for an NBD target string.

    Accepts ``nbd+unix:///EXPORT?socket=PATH``, ``nbd://HOST[:PORT]/EXPORT`` (also ``nbd+tcp``)
    and the legacy ``nbd:unix:PATH[:exportname=EXPORT]`` /
    ``nbd:HOST:PORT[:exportname=EXPORT]``. Raises ``ValueError`` when *target* is not one.
    """
    if target.startswith("nbd:") and not target.startswith("nbd://"):
        return _parse_legacy(target[4:])
    parts = urlsplit(target)
    scheme = parts.scheme
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    query = parse_qs(parts.query, keep_blank_values=True)
    out: dict[str, Any] = {"driver": "nbd"}
    if scheme == "nbd+unix":
        if parts.netloc:
            raise ValueError(f"nbd+unix URI must not name a host: {target}")
        sock = query.get("socket")
        if not sock or not sock[0]:
            raise ValueError(f"nbd+unix URI needs ?socket=PATH: {target}")
        out["server"] = {"type": "unix", "path": sock[0]}
    elif scheme in ("nbd", "nbd+tcp"):
        if "socket" in query:
            raise ValueError(f"nbd URI over TCP cannot take a socket: {target}")
        host = parts.hostname
        if not host:
            raise ValueError(f"nbd URI needs a host: {target}")
        port = parts.port or P.DEFAULT_PORT
        out["server"] = {"type": "inet", "host": host, "port": str(port)}
    else:
        raise ValueError(f"not an NBD URI: {target}")
    if export:
        out["export"] = export
    return out


def _parse_legacy(rest: str) -> dict[str, Any]:
    export = None
    marker = ":exportname="
    if marker in rest:
        rest, export = rest.split(marker, 1)
    out: dict[str, Any] = {"driver": "nbd"}
    if rest.startswith("unix:"):
        path = rest[5:]
        if not path:
            raise ValueError("nbd:unix: needs a socket path")
        out["server"] = {"type": "unix", "path": path}
    else:
        host, sep, port = rest.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"bad legacy NBD target: nbd:{rest}")
        out["server"] = {"type": "inet", "host": host.strip("[]"), "port": port}
    if export:
        out["export"] = export
    return out
