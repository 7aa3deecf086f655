"""The NBD server as a service: the listener of ``nbd-server-start`` (QEMU's blockdev-nbd.c)
and the registry of block exports (QEMU's block/export/export.c).

:class:`NbdService` (one per daemon, ``daemon.services["nbd"]``) owns the exports by id and at
most one :class:`NbdServer` (the listening sockets). The server owns the
:class:`~blockd.nbd.transmission.NbdConnection` objects; each runs the handshake
(:mod:`blockd.nbd.handshake`) and then the transmission phase against one export.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from blockd.errors import QmpError
from blockd.io.paths import c_bytes
from blockd.nbd.export import NbdExport
from blockd.nbd.transmission import TOTAL_INFLIGHT_BYTES, MemoryBudget, NbdConnection
from blockd.net.sockets import UNIX_PATH_MAX, resolve

log = logging.getLogger(__name__)

#: Kernel socket buffer size asked for each connection (capped by net.core.*mem_max).
SOCKET_BUFFER = 4 * 1024 * 1024
#: While the server is full and a client waits, a connection negotiating for this long is
#: dropped (a real client finishes the handshake in milliseconds).
NEGOTIATION_GRACE = 2.0


# -- listener ------------------------------------------------------------------------------------
class NbdServer:
    """The listening socket(s) of ``nbd-server-start`` and the connections they accepted."""

    def __init__(self, service: NbdService, max_connections: int) -> None:
        self.service = service
        self.max_connections = max_connections
        self.connections: set[NbdConnection] = set()
        self._socks: list[socket.socket] = []
        self._unix_path: bytes | None = None
        self._accepters: list[asyncio.Task[None]] = []
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._slot = asyncio.Event()
        #: Bytes held by all connections together (see TOTAL_INFLIGHT_BYTES).
        self.budget = MemoryBudget(TOTAL_INFLIGHT_BYTES)

    # -- binding (QEMU's util/qemu-sockets.c texts) -----------------------------------------
    async def bind(self, addr: Any) -> None:
        kind = addr.type.value if hasattr(addr.type, "value") else str(addr.type)
        data = addr.data
        if kind == "unix":
            self._bind_unix(data.path, bool(data.abstract), data.tight is not False)
        elif kind == "inet":
            await self._bind_inet(data)
        elif kind == "vsock":
            self._bind_vsock(data.cid, data.port)
        else:
            raise QmpError("only QEMU supports file descriptor passing")

    def _bind_unix(self, path: str, abstract: bool, tight: bool) -> None:
        raw = c_bytes(path)
        if len(raw) >= UNIX_PATH_MAX - (1 if abstract else 0):
            raise QmpError(f"UNIX socket path '{path}' is too long")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if abstract:
                target = b"\0" + raw
                if not tight:
                    target = target.ljust(108, b"\0")
            else:
                target = raw
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(raw)
            try:
                sock.bind(target)
            except OSError as exc:
                raise QmpError(f"Failed to bind socket to {path}: {exc.strerror}") from None
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        if not abstract:
            self._unix_path = raw
        self._socks.append(sock)

    async def _bind_inet(self, data: Any) -> None:
        host, port = data.host, data.port
        family = socket.AF_UNSPEC
        if data.ipv4 and not data.ipv6:
            family = socket.AF_INET
        elif data.ipv6 and not data.ipv4:
            family = socket.AF_INET6
        try:
            infos = await resolve(host, port, family, socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise QmpError(f"address resolution failed for {host}:{port}: {exc.strerror}") from None
        last: OSError | None = None
        for fam, stype, proto, _canon, sa in infos:
            sock = socket.socket(fam, stype, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    # "::" also takes IPv4 clients unless only ipv6 was asked for, as in QEMU
                    # (the live storage migration example listens on "::", connects to
                    # localhost).
                    v6only = 1 if family == socket.AF_INET6 else 0
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
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
        so further clients wait in the backlog instead of being refused.

        One client more is accepted while full: it waits for a slot, and while it does, a
        connection stuck in the handshake for :data:`NEGOTIATION_GRACE` is dropped to make
        room, so clients that connect and say nothing cannot lock everybody out."""
        loop = asyncio.get_running_loop()
        while True:
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
            try:
                while self._full():
                    self._drop_negotiating(time.monotonic() - NEGOTIATION_GRACE)
                    self._slot.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._slot.wait(), NEGOTIATION_GRACE / 4)
            except BaseException:
                conn.close()
                raise
            reader, writer = await asyncio.open_connection(sock=conn, limit=1024 * 1024)
            c = NbdConnection(self, reader, writer)
            self.connections.add(c)
            t = asyncio.create_task(self._run_conn(c), name=f"nbd#{c.num}")
            self._conn_tasks.add(t)
            t.add_done_callback(self._conn_tasks.discard)

    def _drop_negotiating(self, before: float) -> None:
        """Drop the oldest connection still negotiating since *before* (if any)."""
        stuck = [
            c
            for c in self.connections
            if not c.closed and c.negotiating_since is not None and c.negotiating_since <= before
        ]
        if stuck:
            victim = min(stuck, key=lambda c: c.negotiating_since or 0.0)
            log.warning("nbd#%d: still negotiating while the server is full; dropped", victim.num)
            victim.close()

    def drop_stalled(self, before: float) -> None:
        """Drop every connection whose replies have not moved since *before*."""
        now = time.monotonic()
        for c in list(self.connections):
            since = c.output_stalled_since(now)
            if since is not None and since <= before:
                log.warning("nbd#%d: client does not read its replies; dropped", c.num)
                c.close()

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
        await server.bind(addr)
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
