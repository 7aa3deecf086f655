"""The ``file`` protocol driver (QEMU's block/file-posix.c).

Data moves with ``os.pread``/``os.pwrite`` in the I/O pool; holes and zeroes use fallocate;
allocation comes from ``SEEK_DATA``/``SEEK_HOLE``. Image locking uses the same OFD byte locks
as QEMU (bytes 100+bit for held permissions, 200+bit for permissions not shared), so qemu-img
and qemu-storage-daemon see blockd's use of an image and blockd sees theirs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from typing import Any

from blockd.block.driver import BlockDriver, WriteFlags, register_driver
from blockd.block.perm import PERM_NAMES, Perm
from blockd.block.status import BlockStatus, Extent
from blockd.errors import QmpError
from blockd.io.paths import c_bytes, real_path
from blockd.io.pool import run_blocking

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
_LOCK_BITS = [Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE]
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _flock(kind: int, start: int) -> bytes:
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, 1, 0)


def _lock_test(fd: int, byte: int) -> bool:
    """True when another open file description holds a lock on *byte*."""
    res = fcntl.fcntl(fd, _F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    return bool(struct.unpack("hhqqi4x", res)[0] != fcntl.F_UNLCK)


def _lock_set(fd: int, byte: int, kind: int) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _flock(kind, byte))


def _open_blocking(path: str, flags: int, ro: bool, auto_ro: bool) -> tuple[int, bool, int, bool]:
    """Open *path* (falling back to read-only when ``auto-read-only`` allows) and return
    ``(fd, read_only, length, hole_free)``; errors carry QEMU's "Could not open" text."""
    try:
        fd = os.open(c_bytes(path), flags | (os.O_RDONLY if ro else os.O_RDWR))
    except OSError as exc:
        if ro or not auto_ro or exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise QmpError(f"Could not open '{path}': {exc.strerror}") from None
        ro = True
        try:
            fd = os.open(c_bytes(path), flags | os.O_RDONLY)
        except OSError as exc2:
            raise QmpError(f"Could not open '{path}': {exc2.strerror}") from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise QmpError(f"Could not open '{path}': Is a directory")
    length = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
    return fd, ro, length, _has_no_hole(fd, length)


def _pread_blocking(fd: int, offset: int, nbytes: int) -> bytes | bytearray:
    data = os.pread(fd, nbytes, offset)
    if len(data) == nbytes:
        return data
    buf = bytearray(nbytes)
    got = len(data)
    buf[:got] = data
    while got < nbytes:
        more = os.pread(fd, nbytes - got, offset + got)
        if not more:
            break  # past EOF reads as zeroes
        buf[got : got + len(more)] = more
        got += len(more)
    return buf


def _pwrite_blocking(fd: int, offset: int, data: memoryview, sync: bool, behind: bool) -> None:
    done = 0
    n = len(data)
    while done < n:
        done += os.pwrite(fd, data[done:], offset + done)
    if sync:
        os.fdatasync(fd)
    elif behind and _sync_file_range is not None:
        # Only starts writeback of these pages (a hint: errors change nothing).
        _sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)


def _has_no_hole(fd: int, length: int) -> bool:
    """Whether [0, length) is all data (SEEK_HOLE finds the end of the file)."""
    if length <= 0:
        return False
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) >= length
    except OSError:
        return False


def _seek_status(fd: int, offset: int, nbytes: int) -> tuple[bool, int]:
    """(is_data, length) of the run starting at *offset*."""
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False, nbytes  # hole up to EOF
        return True, nbytes
    if data > offset:
        return False, min(nbytes, data - offset)
    try:
        hole = os.lseek(fd, offset, os.SEEK_HOLE)
    except OSError:
        return True, nbytes
    return True, min(nbytes, max(hole - offset, 1))


@register_driver
class FileDriver(BlockDriver):
    format_name = "file"
    can_create = True

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.fd = -1
        self.path = ""
        self._length = 0
        #: The file is known to hold no hole: block status answers without a syscall. Only
        #: ever errs towards "data" (a hole punched behind our back still reads as zeroes).
        self._dense = False
        self._locking = True
        #: Jobs copying into this file (see BlockNode.set_write_behind).
        self._write_behind = 0
        self._held: tuple[Perm, Perm] = (Perm(0), Perm(0))
        #: During a permission update: the state before it, and the state it wants.
        self._before: tuple[Perm, Perm] | None = None
        self._want: tuple[Perm, Perm] = (Perm(0), Perm(0))
        self._zero_range_ok = True
        self._realpath = ""

    async def open(self, options: Any, graph: Any) -> None:
        self.path = options.filename
        self._locking = (options.locking or "auto") != "off"
        flags = os.O_CLOEXEC
        if self.node.cache_direct:
            flags |= os.O_DIRECT
        # open() can block for long on network filesystems: it runs in the I/O pool.
        self.fd, self.node.read_only, self._length, self._dense = await run_blocking(
            _open_blocking, self.path, flags, self.node.read_only, self.node.auto_read_only
        )
        self._realpath = await run_blocking(real_path, self.path)
        if self.node.cache_direct:
            self.limits.request_alignment = 4096 if self._probe_direct_4k() else 512
        self.limits.max_transfer = 0

    def sibling(self, name: str) -> tuple[str, dict[str, Any]]:
        full = name if os.path.isabs(name) else os.path.join(os.path.dirname(self.path), name)
        return full, {"driver": "file", "filename": full}

    def identity(self) -> str:
        return self._realpath or self.path

    def _probe_direct_4k(self) -> bool:
        return True

    async def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self._held = (Perm(0), Perm(0))
            os.close(fd)  # closing drops the OFD locks too

    async def reopen(self, read_only: bool) -> None:
        if read_only == self.node.read_only:
            return
        flags = os.O_CLOEXEC | (os.O_RDONLY if read_only else os.O_RDWR)
        if self.node.cache_direct:
            flags |= os.O_DIRECT
        try:
            fd = os.open(c_bytes(self.path), flags)
        except OSError as exc:
            raise QmpError(f"Could not reopen file: {exc.strerror}") from None
        # The new descriptor takes over the locks the old one holds before the old one is
        # closed (closing drops its locks); the caller's permission update then adjusts
        # them to the new mode.
        held, self._held = self._held, (Perm(0), Perm(0))
        old, self.fd = self.fd, fd
        self._apply_locks(*held)
        os.close(old)
        self.node.read_only = read_only

    # -- locking -------------------------------------------------------------------------
    # The node's combined permissions live in OFD locks (file-posix.c's scheme): byte
    # 100+bit held while blockd uses a permission, 200+bit while it does not share it.
    # A permission update first takes the union of the old and the new state and tests
    # other processes' locks against the new one, then settles on the new state (commit) or
    # goes back to the old (rollback), so a failed update never drops a lock we held.
    def _apply_locks(self, perm: Perm, unshared: Perm) -> None:
        held_perm, held_unshared = self._held
        for i, bit in enumerate(_LOCK_BITS):
            if (perm ^ held_perm) & bit:
                _lock_set(
                    self.fd, LOCK_PERM_BASE + i, fcntl.F_RDLCK if perm & bit else fcntl.F_UNLCK
                )
            if (unshared ^ held_unshared) & bit:
                kind = fcntl.F_RDLCK if unshared & bit else fcntl.F_UNLCK
                _lock_set(self.fd, LOCK_SHARED_BASE + i, kind)
        self._held = (perm, unshared)

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        if not self._locking or self.fd < 0:
            return
        if self.node.force_share:
            shared = Perm.all()
        unshared = Perm.all() & ~shared
        if self._before is None:
            self._before = self._held
        old_perm, old_unshared = self._before
        self._want = (perm, unshared)
        self._apply_locks(perm | old_perm, unshared | old_unshared)
        hint = f"Is another process using the image [{self.path}]?"
        for i, bit in enumerate(_LOCK_BITS):
            if perm & bit and _lock_test(self.fd, LOCK_SHARED_BASE + i):
                raise QmpError(f'Failed to get "{PERM_NAMES[bit]}" lock', hint=hint)
            if unshared & bit and _lock_test(self.fd, LOCK_PERM_BASE + i):
                raise QmpError(f'Failed to get shared "{PERM_NAMES[bit]}" lock', hint=hint)

    def set_perm(self) -> None:
        if self._before is not None:
            self._before = None
            self._apply_locks(*self._want)

    def abort_perm(self) -> None:
        if self._before is not None:
            before, self._before = self._before, None
            self._apply_locks(*before)

    # -- I/O -----------------------------------------------------------------------------
    def getlength(self) -> int:
        # QEMU counts nodes in 512-byte sectors: a file of 1000 bytes is a 1024-byte node
        # whose tail reads as zeroes (and writing it extends the file).
        return -(-self._length // 512) * 512

    async def preadv(self, offset: int, nbytes: int) -> bytes | bytearray:
        return await run_blocking(_pread_blocking, self.fd, offset, nbytes)

    async def pwritev(self, offset: int, data: memoryview, flags: WriteFlags) -> None:
        fua = bool(flags & WriteFlags.FUA)
        await run_blocking(_pwrite_blocking, self.fd, offset, data, fua, self._write_behind > 0)

    def set_write_behind(self, on: bool) -> None:
        self._write_behind = max(0, self._write_behind + (1 if on else -1))

    async def pwrite_zeroes(self, offset: int, nbytes: int, flags: WriteFlags) -> None:
        self._dense = False
        if flags & WriteFlags.MAY_UNMAP:
            try:
                await run_blocking(
                    fallocate, self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, nbytes
                )
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        if self._zero_range_ok:
            try:
                await run_blocking(fallocate, self.fd, FALLOC_FL_ZERO_RANGE, offset, nbytes)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._zero_range_ok = False
        await super().pwrite_zeroes(offset, nbytes, flags)

    async def pdiscard(self, offset: int, nbytes: int) -> None:
        self._dense = False
        try:
            await run_blocking(
                fallocate, self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, nbytes
            )
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise

    async def block_status(self, offset: int, nbytes: int) -> Extent:
        if self._dense:
            # At 64 KiB NBD reads this saved a thread hop per request.
            is_data, n = True, nbytes
        else:
            is_data, n = await run_blocking(_seek_status, self.fd, offset, nbytes)
        flags = BlockStatus.OFFSET_VALID | BlockStatus.ALLOCATED
        flags |= BlockStatus.DATA if is_data else BlockStatus.ZERO
        return Extent(offset, n, flags, map_node=self.node, map_offset=offset)

    async def flush(self) -> None:
        if self.fd >= 0 and not self.node.read_only:
            await run_blocking(os.fdatasync, self.fd)

    async def truncate(self, size: int, exact: bool, prealloc: str) -> None:
        old = self._length
        self._dense = False
        await run_blocking(_truncate_blocking, self.fd, old, size, prealloc)
        self._length = size

    # -- reporting -----------------------------------------------------------------------
    def filename(self) -> str:
        return self.path

    def image_info(self) -> dict[str, Any]:
        return {"dirty-flag": False}  # file-posix answers bdrv_get_info

    def actual_size(self) -> int | None:
        try:
            return os.fstat(self.fd).st_blocks * 512
        except OSError:
            return None

    def has_zero_init(self) -> bool:
        return stat.S_ISREG(os.fstat(self.fd).st_mode)

    # -- blockdev-create -----------------------------------------------------------------
    @staticmethod
    async def create(options: Any, graph: Any) -> None:
        await run_blocking(
            _create_blocking,
            options.filename,
            options.size,
            str(options.preallocation.value if options.preallocation else "off"),
            bool(options.nocow),
        )


def _truncate_blocking(fd: int, old: int, size: int, prealloc: str) -> None:
    os.ftruncate(fd, size)
    if size > old and prealloc == "falloc":
        os.posix_fallocate(fd, old, size - old)
    elif size > old and prealloc == "full":
        zero = bytes(1024 * 1024)
        pos = old
        while pos < size:
            n = min(len(zero), size - pos)
            os.pwrite(fd, zero[:n], pos)
            pos += n


def _create_blocking(path: str, size: int, prealloc: str, nocow: bool) -> None:
    if prealloc == "metadata":
        raise QmpError(f"Unsupported preallocation mode '{prealloc}'")
    try:
        fd = os.open(c_bytes(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise QmpError(f"Could not create '{path}': {exc.strerror}") from None
    try:
        if _lock_test(fd, LOCK_PERM_BASE + 1) or _lock_test(fd, LOCK_PERM_BASE):
            raise QmpError('Failed to get "write" lock')
        if nocow:
            _set_nocow(fd)
        try:
            os.ftruncate(fd, 0)  # only now that nobody else holds the image
            _truncate_blocking(fd, 0, size, prealloc)
        except OSError as exc:
            raise QmpError(f"Could not resize file: {exc.strerror}") from None
    finally:
        os.close(fd)


def _set_nocow(fd: int) -> None:
    FS_IOC_GETFLAGS = 0x80086601
    FS_IOC_SETFLAGS = 0x40086602
    FS_NOCOW_FL = 0x00800000
    try:
        buf = bytearray(fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 8))
        attr = int.from_bytes(buf[:4], "little") | FS_NOCOW_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, attr.to_bytes(4, "little") + b"\0" * 4)
    except OSError:
        pass  # nocow is a hint; filesystems without it ignore it as QEMU does
