"""Resolve and connect the way QEMU's util/qemu-sockets.c does, so that the same host and port
strings give the same addresses and the same errors.

Host and port go to ``getaddrinfo`` as bytes (:func:`blockd.io.paths.c_bytes`): Python would
otherwise run host names through its ``idna`` codec (which refuses labels over 63 characters
with a Python exception) and truncate strings at a NUL. The C library then decides, as it does
for QEMU: ``"abc"`` is an unknown service, ``"99999999"`` wraps to port 57599.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Any

from blockd.io.paths import c_bytes
from blockd.io.pool import run_blocking

AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]


async def resolve(host: str, port: str, family: int, flags: int) -> list[AddrInfo]:
    """``getaddrinfo`` for a stream socket; raises :class:`socket.gaierror`. Resolution can
    block for seconds (DNS), so it runs in the I/O pool."""
    return await run_blocking(
        _getaddrinfo, c_bytes(host) if host else None, c_bytes(port), family, flags
    )


def _getaddrinfo(host: bytes | None, port: bytes, family: int, flags: int) -> list[AddrInfo]:
    return list(socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, flags))


class AddressError(Exception):
    """An address refused before any system call, with QEMU's text."""


#: Size of ``sockaddr_un.sun_path``.
UNIX_PATH_MAX = 108


async def connect_unix(path: str) -> socket.socket:
    """A connected non-blocking socket to the Unix socket *path* (a path filling all of
    ``sun_path``, without a terminating NUL, is allowed for connecting, as in QEMU)."""
    raw = c_bytes(path)
    if len(raw) > UNIX_PATH_MAX:
        raise AddressError(f"UNIX socket path '{path}' is too long")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, raw)
    except BaseException:
        sock.close()
        raise
    return sock


def inet_family(ipv4: bool | None, ipv6: bool | None) -> int:
    """The address family InetSocketAddress's ``ipv4``/``ipv6`` flags ask for."""
    if ipv4 and not ipv6:
        return socket.AF_INET
    if ipv6 and not ipv4:
        return socket.AF_INET6
    return socket.AF_UNSPEC


async def connect_inet(host: str, port: str, family: int = socket.AF_UNSPEC) -> socket.socket:
    """A connected non-blocking socket to the first address of *host*:*port* that answers
    (QEMU's inet_connect_saddr); raises ``gaierror`` or the last connect error."""
    infos = await resolve(host, port, family, socket.AI_ADDRCONFIG | socket.AI_V4MAPPED)
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    for fam, stype, proto, _canon, sa in infos:
        sock = socket.socket(fam, stype, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, sa)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise last or OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))


def listen_inet(
    infos: list[AddrInfo], *, v6only: bool
) -> tuple[list[socket.socket], OSError | None]:
    """Listen on every address of *infos*, as QEMU's listener does for each address a host
    resolves to (``""``: 0.0.0.0 and ``::``). An IPv6 socket takes IPv4 too unless *v6only*;
    where the IPv4 side of the port is taken already (by the 0.0.0.0 socket just bound), it
    serves IPv6 alone, as QEMU's try_bind does. Returns the sockets and the first error."""
    socks: list[socket.socket] = []
    first: OSError | None = None
    for fam, stype, proto, _canon, sa in infos:
        sock = socket.socket(fam, stype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            try:
                sock.bind(sa)
            except OSError as exc:
                if fam != socket.AF_INET6 or v6only or exc.errno != errno.EADDRINUSE:
                    raise
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sa)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            first = first or exc
            continue
        except BaseException:
            sock.close()
            for s in socks:
                s.close()
            raise
        socks.append(sock)
    return socks, first
