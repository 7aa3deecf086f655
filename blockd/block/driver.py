"""The driver interface (QEMU's struct BlockDriver) and the registry of drivers by name.

A driver holds the per-node state of one format or protocol and implements the byte-level
operations. The generic request path in :class:`blockd.block.node.BlockNode` does the checks,
alignment, serialisation, dirty tracking and copy-before-write hooks around it, so a driver never
has to.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from blockd.block.perm import ChildRole, Perm, default_child_perm
from blockd.block.status import BlockStatus, Extent
from blockd.errors import QmpError

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph
    from blockd.block.node import BdrvChild, BlockNode

MiB = 1024 * 1024


class WriteFlags(enum.IntFlag):
    NONE = 0
    FUA = 0x1
    MAY_UNMAP = 0x2  # write-zeroes may deallocate
    NO_FALLBACK = 0x4  # fast zero: fail with ENOTSUP rather than write real zeroes
    #: Store whole clusters compressed (QEMU's BDRV_REQ_WRITE_COMPRESSED): only drivers with
    #: ``supports_compressed_writes`` take it; the request path refuses it for the others.
    COMPRESSED = 0x8


@dataclass(slots=True)
class BlockLimits:
    request_alignment: int = 1
    max_transfer: int = 0  # 0: no limit
    opt_transfer: int = 0
    pwrite_zeroes_alignment: int = 0
    pdiscard_alignment: int = 0
    max_pwrite_zeroes: int = 0


class BlockDriver:
    """Base of every driver. Subclasses set the class attributes and override what they do.

    **Runs in:** the event loop; blocking syscalls go through :func:`blockd.io.pool.run_blocking`.
    **Concurrency:** the node may call the I/O methods concurrently for non-overlapping ranges;
    overlapping writes arrive one after the other.
    """

    format_name: ClassVar[str] = ""
    is_format: ClassVar[bool] = False
    is_filter: ClassVar[bool] = False
    supports_backing: ClassVar[bool] = False
    #: Driver has create support for blockdev-create.
    can_create: ClassVar[bool] = False
    #: Driver takes ``WriteFlags.COMPRESSED`` writes (QEMU's bdrv_co_pwritev_compressed).
    supports_compressed_writes: ClassVar[bool] = False

    def __init__(self, node: BlockNode) -> None:
        self.node = node
        self.limits = BlockLimits()
        #: The backing file name the image records (formats with backing files keep it up to
        #: date; it stays even while ``backing: null`` hides it from the node).
        self.backing_file_name: str | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @staticmethod
    async def create(options: Any, graph: BlockGraph) -> None:
        """``blockdev-create`` for drivers with ``can_create`` (a job runs it)."""
        raise QmpError("Driver does not support blockdev-create")

    async def open(self, options: Any, graph: BlockGraph) -> None:
        """Open from the validated options model; create children with ``graph.open_child``."""

    async def close(self) -> None:
        """Release resources; the node flushes before calling it."""

    async def store_dirty_bitmaps(self) -> None:
        """Write what ``blockdev-del`` must not lose (persistent bitmaps) before the node is
        torn down; raising keeps the node. Formats without such state do nothing."""

    async def reopen(self, read_only: bool) -> None:
        """Switch between read-only and read-write (snapshots, commit)."""

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """Record a new backing file name and format in the image (stream, commit and
        ``change-backing-file``); formats without one cannot (QEMU: -ENOTSUP)."""
        raise OSError(errno.ENOTSUP, "Operation not supported")

    # -- I/O -------------------------------------------------------------------------------
    def getlength(self) -> int:
        raise NotImplementedError

    async def preadv(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        raise OSError(errno.ENOTSUP, "read not supported")

    async def pwritev(self, offset: int, data: memoryview, flags: WriteFlags) -> None:
        raise OSError(errno.ENOTSUP, "write not supported")

    async def pwrite_zeroes(self, offset: int, nbytes: int, flags: WriteFlags) -> None:
        """Default: real zeroes through :meth:`pwritev` (refused for fast-zero requests)."""
        if flags & WriteFlags.NO_FALLBACK:
            raise OSError(errno.ENOTSUP, "fast zero not supported")
        chunk = min(nbytes, MiB)
        zero = memoryview(bytes(chunk))
        pos = offset
        end = offset + nbytes
        while pos < end:
            n = min(chunk, end - pos)
            await self.pwritev(pos, zero[:n], flags & WriteFlags.FUA)
            pos += n

    async def pdiscard(self, offset: int, nbytes: int) -> None:
        """Default: discard is advisory, doing nothing is correct."""

    async def block_status(self, offset: int, nbytes: int) -> Extent:
        """Allocation status of this node alone, starting at *offset* (may be shorter)."""
        return Extent(
            offset,
            nbytes,
            BlockStatus.DATA | BlockStatus.ALLOCATED | BlockStatus.OFFSET_VALID,
            map_node=self.node,
            map_offset=offset,
        )

    async def flush(self) -> None:
        for child in self.node.children.values():
            await child.node.flush()

    async def truncate(self, size: int, exact: bool, prealloc: str) -> None:
        raise QmpError("Image format driver does not support resize")

    # -- reporting -------------------------------------------------------------------------
    def filename(self) -> str:
        """The name QEMU shows in ``file``/``image.filename`` (a path, URI or json:{...})."""
        return self.node.json_filename()

    def image_info(self) -> dict[str, Any]:
        """Extra ImageInfo members (cluster-size, format-specific, dirty-flag…)."""
        return {}

    def info_cluster_size(self) -> int | None:
        """The cluster size QEMU's bdrv_get_info reports, if the format has one: bitmap
        granularity and the copy granule follow it."""
        return None

    def header_backing_name(self) -> str | None:
        """The backing file the image itself names, for ``backing_file`` before a backing
        node is attached."""
        return None

    def on_backing_attached(self, backing: BlockNode | None) -> None:
        """A backing node was attached (a snapshot) or dropped by a graph change."""

    def set_write_behind(self, on: bool) -> None:
        """A job starts (*on*) or stops copying into this node. A protocol that buffers
        writes (the page cache of ``file``) then starts writing them out at once, so the
        flush a job ends with has little left: the disk works while the copy goes on instead
        of after it. Calls nest; the default has nothing to do."""

    async def open_backing_from_header(self, graph: BlockGraph) -> None:
        """Open the backing file the image names, for a node opened with ``backing: null``
        (a drive-mirror target with mode=existing gets its chain at completion). Formats
        without backing files have nothing to open."""

    def actual_size(self) -> int | None:
        """Bytes allocated on the host, when the driver knows (file: st_blocks * 512)."""
        return None

    def has_zero_init(self) -> bool:
        return False

    def internal_bitmap_infos(self) -> list[dict[str, Any]]:
        """``dirty-bitmaps`` entries for bitmaps a job keeps on this node (QEMU lists the
        copy-before-write filter's anonymous bitmaps)."""
        return []

    def child_perm(self, role: ChildRole, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        """What this node needs on a child in *role*, given what its own parents need
        (QEMU's bdrv_default_perms)."""
        return default_child_perm(not self.node.read_only, role, perm, shared)

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        """A permission update wants this node's users to hold *perm* and share *shared*:
        raise QmpError if the host side (locks) cannot have it. Followed by exactly one of
        :meth:`set_perm` or :meth:`abort_perm` (see blockd.block.perm.PermUpdate)."""

    def set_perm(self) -> None:
        """The update that called :meth:`check_perm` is committed."""

    def abort_perm(self) -> None:
        """The update that called :meth:`check_perm` is rolled back."""

    def on_child_replaced(self, child: BdrvChild) -> None:
        """A child edge now points to another node (snapshot or pivot below us)."""

    # -- persistent dirty bitmaps ------------------------------------------------------------
    def can_store_new_dirty_bitmap(self, name: str, granularity: int) -> None:
        """Refuse a ``persistent`` bitmap this format cannot store (QEMU's
        bdrv_can_store_new_dirty_bitmap)."""
        raise QmpError(
            f"Can't store persistent bitmaps to {self.node.node_name}: Operation not supported"
        )

    async def remove_persistent_dirty_bitmap(self, name: str) -> None:
        """Drop a stored bitmap from the image (formats that store them)."""

    # -- the protocol layer (see blockd.block.probe) ------------------------------------------
    @classmethod
    def probe(cls, buf: bytes, filename: str) -> int:
        """How sure this format is that an image starting with *buf* is its own (QEMU's
        bdrv_probe: 0 no, 100 a magic number matched)."""
        return 0

    def sibling(self, name: str) -> tuple[str, dict[str, Any]] | None:
        """Protocol drivers: the full name and blockdev options of the file *name* (absolute
        or relative to this node's file) on the same storage, or None when this protocol has
        no notion of a neighbouring file (nbd). Nodes above a file (formats, filters) ask
        it, as QEMU's bdrv_dirname recurses into ``bs->file``."""
        below = self.node.file
        return below.driver.sibling(name) if below is not None else None

    def identity(self) -> str:
        """A name that is equal for two nodes on the same file (loop detection in chains
        opened from image headers)."""
        below = self.node.file
        return below.driver.identity() if below is not None else self.filename()


_DRIVERS: dict[str, type[BlockDriver]] = {}


def register_driver(cls: type[BlockDriver]) -> type[BlockDriver]:
    _DRIVERS[cls.format_name] = cls
    return cls


def driver_class(name: str) -> type[BlockDriver] | None:
    _load_builtin_drivers()
    return _DRIVERS.get(name)


def all_drivers() -> list[type[BlockDriver]]:
    _load_builtin_drivers()
    return list(_DRIVERS.values())


_loaded = False


def _load_builtin_drivers() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    import blockd.block.drivers as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
