"""One ssh connection, its SFTP channel and the open remote file, with a window of requests in
flight.

QEMU's driver sends one SFTP request and waits for its answer before the next (about 50 MiB/s on
loopback). Here a request is cut into pieces of the server's read/write limit and the pieces go
out together; every piece of every caller passes one semaphore per connection, so the copy
engine's parallel tasks share a bounded window instead of multiplying it. A short read (OpenSSH
returns at most 261120 bytes) is continued, end of file reads as zeroes, and the first failing
piece cancels its siblings and fails the request.

Opening follows QEMU's connect_to_ssh step by step, because the step that fails decides the
error text: port check, TCP connect, key exchange with the host key check, authentication,
SFTP start, file open, fstat. Whatever fails, the connection is closed before the error is
reported (qemu-storage-daemon leaves failed connections open).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from blockd.block.drivers.ssh import clientconf, hostkey
from blockd.errors import QmpError
from blockd.io.pool import run_blocking
from blockd.net.sockets import connect_inet, inet_family

log = logging.getLogger(__name__)

#: Requests in flight per connection. 32 pieces of 255 KiB keep loopback and LAN links busy;
#: more only adds memory.
WINDOW = 32
#: Write pieces in flight per connection, within the window. OpenSSH accepts 2 MiB before it
#: adjusts its window; writes beyond that only wait in asyncssh's send buffer, which cuts them
#: into packets by copying, and measured slower (8 pieces: 180-210 MiB/s on loopback, 32: 125-170).
WRITE_WINDOW = 8
#: Flow-control window and largest packet this client accepts: the whole request window may
#: be answered without waiting for a window adjust, in few large packets (each packet costs a
#: Python-level decrypt and parse; OpenSSH sends up to what the client allows).
WINDOW_BYTES = 16 * 1024 * 1024
MAX_PACKET = 256 * 1024
#: Piece size when the server announces no limit (OpenSSH announces 261120 for reads).
DEFAULT_PIECE = 256 * 1024
#: Preferred ciphers: AES-GCM runs in OpenSSL's AES-NI code, chacha20 in slower Python glue.
CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
AUTH_FAILED = (
    "failed to authenticate using publickey authentication and the identities held by "
    "your ssh-agent"
)


@dataclass(frozen=True)
class Target:
    """Where to connect and how to trust it (the validated blockdev options, flattened)."""

    host: str
    port: str
    path: str
    user: str | None
    mode: str  # none | hash | known_hosts
    hash_type: str = ""
    hash: str = ""
    ipv4: bool | None = None
    ipv6: bool | None = None

    @classmethod
    def from_options(cls, opts: Any) -> Target:
        hkc = opts.host_key_check
        mode = str(hkc.mode.value) if hkc is not None else "known_hosts"
        return cls(
            host=opts.server.host,
            port=opts.server.port,
            path=opts.path,
            user=opts.user,
            mode=mode,
            hash_type=str(hkc.type.value) if mode == "hash" else "",
            hash=str(hkc.hash) if mode == "hash" else "",
            ipv4=opts.server.ipv4,
            ipv6=opts.server.ipv6,
        )


def parse_port(text: str) -> int:
    """QEMU's qemu_strtoui() check of ``server.port``: C ``strtoull`` rules (blanks and a sign
    before the digits, negative numbers wrap), nothing after the digits, and the value must
    fit an int or unsigned int."""
    s = text.lstrip(" \t\n\v\f\r")
    digits = s[1:] if s[:1] in ("+", "-") else s
    if not digits.isascii() or not digits.isdigit() or int(digits) >= 2**64:
        raise QmpError("Use only numeric port value")
    value = (-int(digits)) % 2**64 if s[:1] == "-" else int(digits)
    signed = value - 2**64 if value >= 2**63 else value
    if signed > 2**32 - 1 or signed < -(2**31):
        raise QmpError("Use only numeric port value")
    return signed % 2**32


def _blob_type(blob: bytes) -> str:
    n = int.from_bytes(blob[:4], "big")
    return blob[4 : 4 + n].decode("ascii", "replace")


class _Client(asyncssh.SSHClient):
    """Host key decision during the key exchange, and notice of a dropped connection."""

    def __init__(self, target: Target, known: list[hostkey.KnownKey], strict: bool) -> None:
        self.target = target
        self.known = known
        self.strict = strict
        self.refusal: str | None = None
        self.lost = asyncio.Event()

    def validate_host_public_key(self, host: str, addr: str, port: int, key: Any) -> bool:
        blob = bytes(key.public_data)
        kind = _blob_type(blob)
        t = self.target
        if t.mode == "hash":
            self.refusal = hostkey.check_hash(kind, blob, t.hash_type, t.hash)
        elif t.mode == "known_hosts" and self.strict:
            self.refusal = hostkey.check_known_hosts(kind, blob, self.known)
        return self.refusal is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


async def _tcp_connect(t: Target) -> socket.socket:
    """QEMU's inet_connect_saddr() with its texts; the port string goes to the C library as
    given (after the numeric check), so it wraps and fails as it does for QEMU."""
    try:
        return await connect_inet(t.host, t.port, inet_family(t.ipv4, t.ipv6))
    except socket.gaierror as exc:
        raise QmpError(f"address resolution failed for {t.host}:{t.port}: {exc.strerror}") from None
    except OSError as exc:
        # asyncio's connect error carries its own text; QEMU prints strerror(errno).
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise QmpError(f"Failed to connect to '{t.host}:{t.port}': {reason}") from None


def _sftp_text(what: str, exc: asyncssh.SFTPError) -> str:
    return f"{what}: SFTP server: {exc.reason} (libssh error code: 1, sftp error code: {exc.code})"


class SftpSession:
    """An open remote file. **Raises** OSError(EIO) from I/O once anything went wrong."""

    def __init__(
        self,
        conn: asyncssh.SSHClientConnection,
        client: _Client,
        sftp: asyncssh.SFTPClient,
        file: asyncssh.SFTPClientFile,
        attrs: asyncssh.SFTPAttrs,
        user: str,
    ) -> None:
        self.conn = conn
        self.client = client
        self.sftp = sftp
        self.file = file
        self.user = user
        self.size = int(attrs.size or 0)
        perms = attrs.permissions
        self.is_regular = perms is not None and (perms & 0o170000) == 0o100000
        limits = sftp.limits
        self.read_piece = min(limits.max_read_len or DEFAULT_PIECE, DEFAULT_PIECE)
        self.write_piece = min(limits.max_write_len or DEFAULT_PIECE, DEFAULT_PIECE)
        self.window = asyncio.Semaphore(WINDOW)
        self.write_window = asyncio.Semaphore(WRITE_WINDOW)
        self.label = f"{user}@{conn.get_extra_info('peername')}"
        self._failed = False

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    async def open(cls, t: Target, pflags: int, mode: int | None = None) -> SftpSession:
        port = parse_port(t.port)
        setup = await run_blocking(clientconf.load, t.user, t.host, port)
        agent, agent_keys = await _agent()
        try:
            sock = await _tcp_connect(t)
        except BaseException:
            if agent is not None:
                agent.close()
            raise
        client = _Client(t, setup.known, setup.strict)
        try:
            conn = await asyncssh.connect(
                t.host,
                port % 65536,
                sock=sock,
                client_factory=lambda: client,
                username=setup.user,
                known_hosts=([], [], []),
                server_host_key_algs=hostkey.preferred_algs(setup.known),
                client_keys=agent_keys + setup.keys or None,
                agent_path=None,
                agent_identities=None,
                config=None,
                x509_trusted_certs=None,
                x509_trusted_cert_paths=None,
                compression_algs=None,
                encryption_algs=list(CIPHERS),
                password_auth=False,
                kbdint_auth=False,
                gss_auth=False,
                host_based_auth=False,
                keepalive_interval=15,
                keepalive_count_max=4,
                window=WINDOW_BYTES,
                max_pktsize=MAX_PACKET,
            )
        except asyncssh.HostKeyNotVerifiable:
            sock.close()
            raise QmpError(client.refusal or hostkey.NOT_FOUND) from None
        except asyncssh.PermissionDenied:
            sock.close()
            raise QmpError(AUTH_FAILED) from None
        except (asyncssh.Error, OSError) as exc:
            sock.close()
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            raise QmpError(
                f"failed to establish SSH session: {reason} (libssh error code: 2)"
            ) from None
        finally:
            if agent is not None:
                agent.close()
        try:
            return await cls._open_file(conn, client, t, pflags, mode, setup.user)
        except BaseException:
            await _close_conn(conn)
            raise

    @classmethod
    async def _open_file(
        cls,
        conn: asyncssh.SSHClientConnection,
        client: _Client,
        t: Target,
        pflags: int,
        mode: int | None,
        user: str,
    ) -> SftpSession:
        try:
            sftp = await conn.start_sftp_client()
        except (asyncssh.Error, OSError) as exc:
            raise QmpError(f"failed to initialize sftp handle: {exc}") from None
        attrs = asyncssh.SFTPAttrs(permissions=mode) if mode is not None else asyncssh.SFTPAttrs()
        try:
            # One SFTP request per call: the pieces and the window are ours (see read/write).
            f = _direct_writes(
                await sftp.open(
                    t.path, pflags, attrs, encoding=None, block_size=DEFAULT_PIECE, max_requests=1
                )
            )
        except asyncssh.SFTPError as exc:
            raise QmpError(_sftp_text(f"failed to open remote file '{t.path}'", exc)) from None
        try:
            st = await f.stat()
        except asyncssh.SFTPError as exc:
            with contextlib.suppress(asyncssh.Error, OSError):
                await f.close()
            raise QmpError(_sftp_text("failed to read file attributes", exc)) from None
        return cls(conn, client, sftp, f, st, user)

    # -- requests --------------------------------------------------------------------------
    def _alive(self) -> None:
        if self.client.lost.is_set():
            raise OSError(errno.EIO, "ssh connection lost")

    async def _one(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        async with self.window:
            self._alive()
            try:
                return await call()
            except (asyncssh.Error, OSError, ValueError) as exc:
                if not self._failed:
                    self._failed = True  # one line per connection, not one per piece
                    log.warning("ssh %s on %s failed: %s", what, self.label, exc)
                raise OSError(errno.EIO, f"ssh {what} failed: {exc}") from None

    async def read(self, offset: int, nbytes: int) -> bytes | bytearray:
        """*nbytes* at *offset*; past the remote end of file reads as zeroes."""
        piece = self.read_piece
        if nbytes <= piece:
            data = await self._one("read", lambda: self.file.read(nbytes, offset))
            if len(data) < nbytes:
                data = bytes(data) + bytes(nbytes - len(data))
            return data  # type: ignore[no-any-return]
        out = bytearray(nbytes)

        async def part(pos: int, n: int) -> None:
            data = await self._one("read", lambda: self.file.read(n, offset + pos))
            out[pos : pos + len(data)] = data

        await _all(part(p, min(piece, nbytes - p)) for p in range(0, nbytes, piece))
        return out

    async def write(self, offset: int, data: memoryview) -> None:
        piece = self.write_piece
        n = len(data)
        if n <= piece:
            await self._write_piece(offset, data)
        else:
            await _all(
                self._write_piece(offset + p, data[p : p + piece]) for p in range(0, n, piece)
            )
        self.size = max(self.size, offset + n)

    async def _write_piece(self, offset: int, data: memoryview) -> None:
        async with self.write_window:
            await self._one("write", lambda: self.file.write(bytes(data), offset))

    async def fsync(self) -> bool:
        """fsync@openssh.com; False when the server does not offer it."""
        async with self.window:
            self._alive()
            try:
                await self.file.fsync()
            except asyncssh.SFTPOpUnsupported:
                return False
            except (asyncssh.Error, OSError) as exc:
                raise OSError(errno.EIO, f"ssh fsync failed: {exc}") from None
        return True

    async def reopen(self, path: str, pflags: int) -> None:
        """A new handle with other access flags on the same connection, then the old one
        closed: requests in flight keep the handle they started with."""
        try:
            f = _direct_writes(
                await self.sftp.open(
                    path, pflags, encoding=None, block_size=DEFAULT_PIECE, max_requests=1
                )
            )
        except asyncssh.SFTPError as exc:
            raise QmpError(_sftp_text(f"failed to open remote file '{path}'", exc)) from None
        except (asyncssh.Error, OSError) as exc:
            raise QmpError(f"failed to reopen remote file '{path}': {exc}") from None
        old, self.file = self.file, f
        with contextlib.suppress(asyncssh.Error, OSError):
            await old.close()

    async def set_size(self, size: int) -> None:
        await self._one("setstat", lambda: self.file.setstat(asyncssh.SFTPAttrs(size=size)))
        self.size = size

    async def close(self) -> None:
        if not self.client.lost.is_set():
            with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
                await asyncio.wait_for(self.file.close(), 5)
        self.sftp.exit()
        await _close_conn(self.conn)


async def _agent() -> tuple[asyncssh.SSHAgentClient | None, list[Any]]:
    """The ssh-agent at ``$SSH_AUTH_SOCK`` and its keys, which libssh tries before the identity
    files; no agent (or a dead socket) is no keys."""
    path = os.environ.get("SSH_AUTH_SOCK")
    if not path:
        return None, []
    try:
        agent = await asyncssh.connect_agent(path)
    except (asyncssh.Error, OSError, ValueError):
        return None, []
    try:
        return agent, list(await agent.get_keys())
    except (asyncssh.Error, OSError, ValueError):
        agent.close()
        return None, []


async def _close_conn(conn: asyncssh.SSHClientConnection) -> None:
    conn.close()
    with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
        await asyncio.wait_for(conn.wait_closed(), 5)


async def _all(calls: Any) -> None:
    """Run the pieces of one request together; the first failure cancels the others."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _direct_writes(f: asyncssh.SFTPClientFile) -> asyncssh.SFTPClientFile:
    """Writes as one SFTP request each, straight to the handler: the pieces are already cut
    to the server's limit, and asyncssh's parallel writer around a single request (a task
    and its bookkeeping per call) cost the write path a share of its CPU. Reads keep it: it
    continues short reads."""
    f.write_len = 0
    return f
