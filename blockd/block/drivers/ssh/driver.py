"""The ``ssh`` protocol driver (QEMU's block/ssh.c): a node whose bytes are a file on another
host, read and written over SFTP.

Behaviour and texts follow qemu-storage-daemon 7.2 (see :mod:`.session` for opening and the
request window). Where blockd differs on purpose:

- many requests in flight per connection instead of one at a time;
- a connection that drops fails every request with EIO at once (the job's error policy
  decides), and no connection outlives a failed open or ``blockdev-del``;
- a name relative to or absolute on this node (a backing file) is opened on the same host
  with the same user and host key check, where QEMU reopens it by URI with the default check
  (and opens absolute names locally);
- the node may give back a tail it grew itself and never wrote (a qcow2 closing trims its
  growth reserve); shrinking below that is refused with QEMU's text.
"""

from __future__ import annotations

import errno
import logging
import posixpath
from typing import Any

import asyncssh

from blockd.block.driver import BlockDriver, WriteFlags, register_driver
from blockd.block.drivers.ssh.session import SftpSession, Target, parse_port
from blockd.errors import QmpError

log = logging.getLogger(__name__)

_READ = asyncssh.FXF_READ
_WRITE = asyncssh.FXF_READ | asyncssh.FXF_WRITE
_CREATE = asyncssh.FXF_READ | asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC


@register_driver
class SshDriver(BlockDriver):
    format_name = "ssh"
    can_create = True

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.session: SftpSession | None = None
        self.target: Target | None = None
        self._server: dict[str, Any] = {}
        self._uri_ok = True
        self._size_at_open = 0
        self._written_end = 0
        self._warned_fsync = False

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self, options: Any, graph: Any) -> None:
        self.target = Target.from_options(options)
        self._server = options.server.wire()
        srv = options.server
        # QEMU's ssh_refresh_filename: these cannot be said in a plain host:port.
        self._uri_ok = all(v is None for v in (srv.ipv4, srv.ipv6, srv.to, srv.numeric))
        flags = _READ if self.node.read_only else _WRITE
        self.session = await SftpSession.open(self.target, flags)
        self._size_at_open = self._written_end = self.session.size

    async def close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close()

    async def reopen(self, read_only: bool) -> None:
        # QEMU cannot reopen ssh nodes at all; here snapshots and commits over ssh work.
        if read_only != self.node.read_only and self.target is not None:
            await self._live().reopen(self.target.path, _READ if read_only else _WRITE)
            self.node.read_only = read_only

    def _live(self) -> SftpSession:
        if self.session is None:
            raise OSError(errno.EIO, "ssh node is closed")
        return self.session

    # -- I/O -------------------------------------------------------------------------------
    def getlength(self) -> int:
        return self.session.size if self.session is not None else 0

    async def preadv(self, offset: int, nbytes: int) -> bytes | bytearray:
        return await self._live().read(offset, nbytes)

    async def pwritev(self, offset: int, data: memoryview, flags: WriteFlags) -> None:
        session = self._live()
        await session.write(offset, data)
        self._written_end = max(self._written_end, offset + len(data))
        if flags & WriteFlags.FUA:
            await self.flush()

    async def flush(self) -> None:
        if self.session is None or self.node.read_only:
            return
        if not await self.session.fsync() and not self._warned_fsync:
            # QEMU's unsafe_flush_warning: once per node, and the flush still succeeds.
            self._warned_fsync = True
            host = self.target.host if self.target else "?"
            log.warning("ssh server %s does not support fsync", host)

    async def truncate(self, size: int, exact: bool, prealloc: str) -> None:
        if prealloc != "off":
            raise QmpError(f"Unsupported preallocation mode '{prealloc}'")
        session = self._live()
        if size < session.size:
            if size < max(self._size_at_open, self._written_end):
                raise QmpError("ssh driver does not support shrinking files")
            await session.set_size(size)
        elif size > session.size:
            # QEMU's ssh_grow_file: one zero byte at the new end.
            await session.write(size - 1, memoryview(b"\0"))

    def has_zero_init(self) -> bool:
        return self.session is not None and self.session.is_regular

    # -- naming ----------------------------------------------------------------------------
    def _uri(self, path: str) -> str:
        t = self.target
        assert t is not None and self.session is not None
        return f"ssh://{self.session.user}@{t.host}:{t.port}{path}"

    def filename(self) -> str:
        if self.target is None or self.session is None or not self._uri_ok:
            return self.node.json_filename()
        return self._uri(self.target.path)

    def sibling(self, name: str) -> tuple[str, dict[str, Any]]:
        t = self.target
        assert t is not None
        path = name if name.startswith("/") else posixpath.join(posixpath.dirname(t.path), name)
        opts: dict[str, Any] = {"driver": "ssh", "server": dict(self._server), "path": path}
        for key in ("user", "host-key-check"):
            if key in self.node.options:
                opts[key] = self.node.options[key]
        return self._uri(path), opts

    def identity(self) -> str:
        t = self.target
        assert t is not None and self.session is not None
        port = parse_port(t.port)
        return f"ssh://{self.session.user}@{t.host.lower()}:{port}{posixpath.normpath(t.path)}"

    # -- blockdev-create -------------------------------------------------------------------
    @staticmethod
    async def create(options: Any, graph: Any) -> None:
        """QEMU's ssh_co_create: create or truncate the file (mode 0644), then grow it."""
        session = await SftpSession.open(Target.from_options(options.location), _CREATE, 0o644)
        try:
            if options.size > 0:
                try:
                    await session.write(options.size - 1, memoryview(b"\0"))
                except OSError as exc:
                    raise QmpError(f"Failed to grow file: {exc.strerror}") from None
        finally:
            await session.close()
