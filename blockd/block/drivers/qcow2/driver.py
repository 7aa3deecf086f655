"""The qcow2 format driver (QEMU's block/qcow2.c and the request half of qcow2-cluster.c).

Request flow: mapping lookups and every metadata change happen under one asyncio lock
(``self.lock``, QEMU's ``s->lock``); data reads and writes run outside it, so requests to
different ranges overlap their I/O. A write that needs new clusters reserves its guest clusters
(``_inflight``) before dropping the lock, so a concurrent write to another part of the same
cluster waits instead of allocating it twice.

Crash consistency (kill -9 or power loss at any point leaves an image ``qemu-img check``
calls clean, leaks aside):

* a refcount increment reaches the file before any L2 entry that points to the cluster
  (the L2 cache writes and syncs the refcount cache first);
* an L2 table reaches the file before the L1 entry that points to it (L1 entries are written
  only after the L2 cache, with a sync between);
* a refcount decrement is queued and applied only after the L2/L1 change that dropped the
  reference is on disk (``_pending_free``);
* QCOW_OFLAG_COPIED is set exactly on clusters blockd allocates (refcount 1); a cluster
  without it is never written in place but copied.

The dirty bit is never set: refcounts are always kept exact (no lazy refcounts).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import struct
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blockd.bitmap.dirty import bitmaps_of
from blockd.block.driver import BlockDriver, WriteFlags, register_driver
from blockd.block.drivers.metacache import read_zero_padded
from blockd.block.drivers.qcow2 import compress
from blockd.block.drivers.qcow2.bitmaps import BitmapStore
from blockd.block.drivers.qcow2.cluster import (
    COMPRESSED,
    NORMAL,
    UNALLOCATED,
    ZERO_ALLOC,
    ZERO_PLAIN,
    ClusterMap,
    cluster_type,
    writable_in_place,
)
from blockd.block.drivers.qcow2.header import (
    AUTOCLEAR_KNOWN,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    L2E_OFFSET_MASK,
    MAGIC,
    OFF_AUTOCLEAR,
    OFF_SIZE,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Qcow2Header,
    parse_header,
    peek_cluster_bits,
)
from blockd.block.drivers.qcow2.refcount import RefcountManager
from blockd.block.jsonname import json_name, open_options
from blockd.block.perm import ChildRole
from blockd.block.probe import full_name, open_backing
from blockd.block.status import BlockStatus, Extent
from blockd.errors import QmpError
from blockd.io.pool import run_blocking

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph
    from blockd.block.node import BlockNode

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: Queued frees past this many bytes force a metadata sync so space gets reused.
_PENDING_FREE_LIMIT = 64 * MiB
#: At most this many clusters per write step (one data write, one allocation).
_MAX_STEP_CLUSTERS = 8192
#: At most this many guest bytes per compressed write step (one compression hop, one data
#: write per contiguous host run, one L2 update).
_MAX_COMPRESSED_STEP = 4 * MiB
#: QEMU's BDRV_MAX_LENGTH: no request may reach past it (a bitmap table offset of 2^63 + x
#: in a hostile directory is an I/O error there, not a table of zeroes).
_MAX_FILE_END = (1 << 63) - (1 << 30)


class _Run:
    """Consecutive guest clusters that are read the same way."""

    __slots__ = ("host", "kind", "length", "offset")

    def __init__(self, kind: int, offset: int, length: int, host: int) -> None:
        self.kind = kind
        self.offset = offset
        self.length = length
        self.host = host  # NORMAL/ZERO_ALLOC: host offset of *offset*; COMPRESSED: L2 entry


@register_driver
class Qcow2Driver(BlockDriver):
    format_name = "qcow2"
    is_format = True
    supports_backing = True
    can_create = True
    supports_compressed_writes = True

    @classmethod
    def probe(cls, buf: bytes, filename: str) -> int:
        return 100 if len(buf) >= 4 and struct.unpack_from(">I", buf)[0] == MAGIC else 0

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self.hdr: Qcow2Header | None = None
        self.size = 0
        self.cluster_bits = 16
        self.cluster_size = 1 << 16
        self.lock = asyncio.Lock()
        self.refcounts: RefcountManager | None = None
        self.map: ClusterMap | None = None
        self.layout: compress.CompressedLayout | None = None
        #: Backing format as recorded in the header (its name: BlockDriver.backing_file_name).
        self.backing_format: str | None = None
        self.full_backing_file_name: str | None = None
        #: What the node's backing is expected to be called (QEMU's auto_backing_file): the
        #: header's name, or the node opened from it; another backing makes the node's
        #: filename a json: description of its options.
        self.auto_backing_file: str | None = None
        self._inflight: list[tuple[int, int, asyncio.Event]] = []
        self._pending_free: list[tuple[int, int]] = []
        #: Freed host ranges to discard in the file once their refcount is 0 (QEMU's
        #: pass-discard-request for discard and unmapping write-zeroes requests).
        self._pending_discard: list[tuple[int, int]] = []
        self._pass_discard_request = True
        self._pending_free_bytes = 0
        self._reads = 0
        self._file_len_at_open = 0
        self._written_end = 0
        self._grown = False
        self._grow_lock = asyncio.Lock()
        self._dcache: tuple[int, bytes] | None = None
        self._opened = False
        self._other_meta: set[int] = set()
        #: Persistent dirty bitmaps (the bitmaps extension).
        self.bitmaps = BitmapStore(self)
        #: Set once the bitmaps are written for good (blockdev-del, close): never twice.
        self._bitmaps_stored = False
        self._backing_null = False
        self._v2 = False

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def file(self) -> BlockNode:
        return self.node.children["file"].node

    @property
    def _m(self) -> ClusterMap:
        assert self.map is not None
        return self.map

    @property
    def _r(self) -> RefcountManager:
        assert self.refcounts is not None
        return self.refcounts

    async def read_meta(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        return await self._read_file(offset, nbytes)

    async def write_meta(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_meta_write(offset, len(data))
        await self._write_file(offset, data)

    async def write_header(self, offset: int, data: bytes) -> None:
        await self._write_file(offset, data)

    async def sync(self) -> None:
        await self.file.flush()

    async def _read_file(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        """Read from the image file; bytes past its end read as zeroes (as QEMU's file
        driver pads short reads). A read reaching past QEMU's largest request end (2^63 less
        1 GiB) fails as QEMU's request check fails it, instead of reading as zeroes."""
        if offset + nbytes > _MAX_FILE_END:
            raise OSError(errno.EIO, f"qcow2: read at {offset:#x} beyond the largest file offset")
        return await read_zero_padded(self.file, offset, nbytes)

    async def _write_file(
        self, offset: int, data: bytes | bytearray | memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        end = offset + len(data)
        if end > self.file.length:
            await self._grow_file(end)
        await self.file.write(offset, data, flags)
        if end > self._written_end:
            self._written_end = end

    async def _grow_file(self, end: int) -> None:
        """Extend the file ahead of writes, in steps, so sequential allocation does not cost
        a truncate per request; :meth:`close` trims what was never written."""
        async with self._grow_lock:
            cur = self.file.length
            if end <= cur:
                return
            step = min(max(end // 8, 4 * MiB), 256 * MiB)
            new = -(-(end + step) // self.cluster_size) * self.cluster_size
            await self.file.truncate(new)
            self._grown = True

    def _check_meta_write(self, offset: int, nbytes: int) -> None:
        """Refuse table writes onto the header (QEMU's overlap check, "constant" part): on a
        corrupt image a table offset of 0 must fail the request, not destroy the image."""
        if offset < self.cluster_size and self._opened:
            raise OSError(errno.EIO, f"qcow2: metadata write at {offset:#x} overlaps the header")

    def _check_data_overlap(self, host: int, nbytes: int) -> None:
        """Refuse data writes onto metadata clusters (QEMU's overlap check, "cached" mode)."""
        cb = self.cluster_bits
        first = host >> cb
        last = (host + nbytes - 1) >> cb
        m, r = self._m, self._r
        l1 = m.l1_clusters
        for c in range(first, last + 1):
            if (
                c == 0
                or c in m.l2_clusters
                or c in r.meta_clusters
                or c in self._other_meta
                or c in l1
            ):
                raise OSError(errno.EIO, f"qcow2: data write to host cluster {c} overlaps metadata")

    # -- open / close --------------------------------------------------------------------------
    async def open(self, options: Any, graph: BlockGraph) -> None:
        if options.data_file is not None:
            raise QmpError("blockd does not support qcow2 external data files ('data-file')")
        await graph.open_child(self.node, options.file, "file", ChildRole.image())
        flen = self.file.length
        self._file_len_at_open = flen
        self._written_end = flen
        head = await self._read_file(0, min(flen, 512))
        if len(head) < 72:
            raise QmpError("Image is not in qcow2 format")
        cb = peek_cluster_bits(bytes(head))
        buf = await self._read_file(0, min(flen, 1 << cb))
        hdr = parse_header(bytes(buf))
        self._refuse_unsupported(hdr, self.node.read_only)
        compress.check_supported(hdr.compression_type)
        self.hdr = hdr
        self.size = hdr.size // 512 * 512
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = hdr.cluster_size
        self.layout = compress.CompressedLayout(hdr.cluster_bits)
        self._v2 = hdr.version < 3
        self.limits.pwrite_zeroes_alignment = self.cluster_size
        self.limits.pdiscard_alignment = self.cluster_size
        if options.lazy_refcounts and hdr.version < 3:
            raise QmpError(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
            )
        if options.pass_discard_request is not None:
            self._pass_discard_request = bool(options.pass_discard_request)

        cs = self.cluster_size
        rc_cache = max(4, (options.refcount_cache_size or MiB) // cs)
        l2_bytes = options.l2_cache_size
        if l2_bytes is None:
            # QEMU: enough to cover the whole image, at most 32 MiB.
            l2_bytes = min(32 * MiB, max(hdr.l1_size, 1) * cs)
        self.refcounts = RefcountManager(
            self,
            hdr.cluster_bits,
            hdr.refcount_order,
            hdr.refcount_table_offset,
            hdr.refcount_table_clusters,
            rc_cache,
        )
        await self.refcounts.load()
        self.map = ClusterMap(
            self,
            hdr.cluster_bits,
            hdr.l1_size,
            hdr.l1_table_offset,
            self.refcounts,
            max(2, l2_bytes // cs),
            self._queue_free,
        )
        await self.map.load()

        self.backing_file_name = hdr.backing_file
        self.backing_format = hdr.backing_format
        self.auto_backing_file = hdr.backing_file
        await self._open_backing(options, graph)

        if not self.node.read_only and hdr.version >= 3:
            unknown = hdr.autoclear_features & ~AUTOCLEAR_KNOWN
            if unknown:
                # Bits for features blockd does not know: whoever set them must learn the
                # image was changed behind their back.
                hdr.autoclear_features &= AUTOCLEAR_KNOWN
                await self.write_header(OFF_AUTOCLEAR, struct.pack(">Q", hdr.autoclear_features))
                await self.sync()
        self._opened = True
        await self.bitmaps.open()
        self.refresh_meta_clusters()

    @staticmethod
    def _refuse_unsupported(hdr: Qcow2Header, read_only: bool) -> None:
        if hdr.crypt_method:
            kind = {1: "AES", 2: "LUKS"}.get(hdr.crypt_method, str(hdr.crypt_method))
            raise QmpError(f"blockd does not support encrypted qcow2 images (encryption: {kind})")
        if hdr.incompatible_features & INCOMPAT_DATA_FILE:
            raise QmpError("blockd does not support qcow2 images with an external data file")
        if hdr.incompatible_features & INCOMPAT_EXTL2:
            raise QmpError(
                "blockd does not support qcow2 images with extended L2 entries (subclusters)"
            )
        if read_only:
            return
        if hdr.incompatible_features & INCOMPAT_CORRUPT:
            raise QmpError("qcow2: Image is corrupt; cannot be opened read/write")
        if hdr.incompatible_features & INCOMPAT_DIRTY:
            raise QmpError(
                "qcow2: Image has the dirty bit set (lazy refcounts) and blockd cannot repair "
                "it; run 'qemu-img check -r all' first or open it read-only"
            )
        if hdr.nb_snapshots:
            raise QmpError(
                "blockd cannot write to qcow2 images with internal snapshots; open it read-only"
            )

    async def _open_backing(self, options: Any, graph: BlockGraph) -> None:
        self.full_backing_file_name = full_name(self.file, self.backing_file_name)
        # With backing: null QEMU forgets the header's name for the node (not for the image
        # info).
        self._backing_null = await open_backing(
            self.node, graph, options, self.backing_file_name, self.backing_format
        )
        if "backing" not in options.model_fields_set and self.node.backing is not None:
            self.auto_backing_file = self.node.backing.filename

    def on_backing_attached(self, backing: BlockNode | None) -> None:
        """A graph change set the backing node (snapshot, stream, ``blockdev-reopen``);
        with none left, the header's name no longer describes the node, as after
        ``backing: null``."""
        self._backing_null = backing is None

    async def open_backing_from_header(self, graph: BlockGraph) -> None:
        """Open the backing file the header names, for a node opened with ``backing: null``
        (a drive-mirror target with mode=existing gets its chain at completion)."""
        self._backing_null = False
        await self._open_backing(types.SimpleNamespace(model_fields_set=set()), graph)

    @property
    def backing_disabled(self) -> bool:
        """``backing: null`` hides a backing file the header names (until one is attached,
        as a snapshot does)."""
        return self._backing_null and bool(self.backing_file_name) and self.node.backing is None

    def refresh_meta_clusters(self) -> None:
        """Recompute the metadata clusters blockd keeps outside L1/L2/refcounts (the bitmap
        directory and tables), so data writes never land on them."""
        self._other_meta = self.bitmaps.meta_clusters()

    def log_warning(self, text: str) -> None:
        log.warning("%s: %s", self.node.node_name, text)

    # -- persistent dirty bitmaps (the hooks blockd.bitmap.dirty documents) ------------------
    def info_cluster_size(self) -> int | None:
        return self.cluster_size

    def header_backing_name(self) -> str | None:
        return None if self.backing_disabled else self.backing_file_name

    def can_store_new_dirty_bitmap(self, name: str, granularity: int) -> None:
        self.bitmaps.can_store_new(name, granularity)

    async def remove_persistent_dirty_bitmap(self, name: str) -> None:
        await self.bitmaps.remove(name)

    async def store_dirty_bitmaps(self) -> None:
        """Write the persistent bitmaps for good, before the node goes away (blockdev-del
        calls this first, so that a failure keeps the node and its bitmaps, and says why).
        Every call tries again: a retry once the cause is gone (space freed) stores them."""
        if self._bitmaps_stored or self.node.read_only or self.map is None:
            return
        try:
            await self.bitmaps.store()
        except QmpError as exc:
            names = ", ".join(f"'{bm.name}'" for bm in self.bitmaps.to_store())
            raise QmpError(
                f"{exc.desc}; node '{self.node.node_name}' is kept with its bitmaps: run "
                f"blockdev-del again once the cause is fixed to store them, or remove {names} "
                "with block-dirty-bitmap-remove to delete the node without them"
            ) from None
        self._bitmaps_stored = True

    async def close(self) -> None:
        if self.map is None or self.refcounts is None or "file" not in self.node.children:
            return
        try:
            if not self.node.read_only and not self.file.closed:
                if not self._bitmaps_stored:
                    try:
                        await self.bitmaps.store()
                        self._bitmaps_stored = True
                    except QmpError as exc:
                        log.error(
                            "%s: persistent bitmaps not stored: %s; %s",
                            self.node.node_name,
                            exc.desc,
                            self.bitmaps.unstored_fate(),
                        )
                async with self.lock:
                    await self._sync_metadata(force_frees=True)
                    await self._trim_file()
                await self.sync()
        finally:
            self.map.cache.clear()
            self.refcounts.cache.clear()

    async def _trim_file(self) -> None:
        """Give back the room :meth:`_grow_file` reserved but nothing used."""
        if not self._grown:
            return
        target = max(self._file_len_at_open, self._written_end)
        if self.file.length > target:
            await self.file.truncate(target)

    async def reopen(self, read_only: bool) -> None:
        if read_only == self.node.read_only:
            return
        if read_only:
            # QEMU's qcow2_reopen_bitmaps_ro: store them, then they are read-only like the node.
            await self.bitmaps.store()
            async with self.lock:
                await self._sync_metadata(force_frees=True)
            await self.sync()
            self.node.read_only = True
            for bm in bitmaps_of(self.node):
                if bm.persistent:
                    bm.readonly = True
            return
        assert self.hdr is not None
        self._refuse_unsupported(self.hdr, False)
        if self.file.read_only:
            await self.file.driver.reopen(False)
        self.node.read_only = False
        # QEMU's qcow2_reopen_bitmaps_rw: the image copies become stale from here on.
        await self.bitmaps.mark_in_use()
        for bm in bitmaps_of(self.node):
            if bm.persistent:
                bm.readonly = False

    async def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        """QEMU's qcow2_change_backing_file: the name and format go into cluster 0, written
        once behind a sync of all metadata, as :meth:`rewrite_header` does."""
        if name is not None and len(name.encode("utf-8", "surrogateescape")) > 1023:
            raise OSError(errno.EINVAL, "Invalid argument")
        if fmt is not None and name is None:
            raise OSError(errno.EINVAL, "Invalid argument")
        old = (self.backing_file_name, self.backing_format, self.full_backing_file_name)
        # An empty name means no backing file, and then the format means nothing either.
        self.backing_file_name = name or None
        self.backing_format = (fmt or None) if name else None
        try:
            await self.rewrite_header()
        except BaseException:
            self.backing_file_name, self.backing_format, self.full_backing_file_name = old
            raise
        self.auto_backing_file = name or None
        self.full_backing_file_name = full_name(self.file, name)

    async def rewrite_header(self) -> None:
        """Write cluster 0 anew from the live state and ``self.hdr.extensions`` (QEMU's
        qcow2_update_header): how the bitmap directory code changes the bitmaps extension.
        Extensions blockd does not interpret are written back byte for byte."""
        hdr, m, r = self.hdr, self._m, self._r
        assert hdr is not None
        hdr.size = self.size
        hdr.l1_size = m.l1_size
        hdr.l1_table_offset = m.l1_offset if m.l1_size else hdr.l1_table_offset
        hdr.refcount_table_offset = r.table_offset
        hdr.refcount_table_clusters = r.table_clusters
        hdr.backing_file = self.backing_file_name
        hdr.backing_format = self.backing_format
        data = hdr.pack_cluster0()
        async with self.lock:
            await self._sync_metadata()
            await self.sync()
            await self.write_header(0, data + bytes(self.cluster_size - len(data)))
            await self.sync()

    # -- metadata sync -------------------------------------------------------------------------
    def _queue_free(self, offset: int, nbytes: int, discard: bool = False) -> None:
        self._pending_free.append((offset, nbytes))
        if discard and self._pass_discard_request:
            self._pending_discard.append((offset, nbytes))
        self._pending_free_bytes += nbytes

    async def _sync_if_many_frees(self) -> None:
        """Apply queued frees once they add up, so space gets reused. Caller holds the lock."""
        if self._pending_free_bytes > _PENDING_FREE_LIMIT and not self._reads:
            await self._sync_metadata()

    async def _sync_metadata(self, force_frees: bool = False) -> None:
        """Write every cached change in crash-safe order. Caller holds ``self.lock``."""
        m, r = self._m, self._r
        await m.cache.flush()  # syncs refcounts first when needed
        if m.l1_dirty:
            await self.sync()
            await m.flush_l1()
        if r.cache.dirty:
            await r.flush()
        if self._pending_free and (self._reads == 0 or force_frees):
            await self.sync()  # the L2/L1 changes that dropped the references are stable
            frees, self._pending_free = self._pending_free, []
            self._pending_free_bytes = 0
            for off, _n in frees:
                m.cache.drop(off)
            for first, count in _merge_clusters(frees, self.cluster_bits):
                try:
                    await r.update(first, count, -1)
                except OSError as exc:  # a corrupt image: leak rather than fail the flush
                    log.warning("%s: cannot free cluster %d: %s", self.node.node_name, first, exc)
            self._dcache = None
            await r.flush()
            discards, self._pending_discard = self._pending_discard, []
            await self._discard_freed(discards)

    async def _discard_freed(self, ranges: list[tuple[int, int]]) -> None:
        """Punch the host clusters that are free now out of the file (the file node does it
        only when opened with discard=unmap). Caller holds the lock, so none of them can be
        allocated again meanwhile."""
        r = self._r
        cb = self.cluster_bits
        for first, count in _merge_clusters(ranges, cb):
            run_start: int | None = None
            for c in range(first, first + count + 1):
                free = c < first + count and await r.get(c) == 0
                if free and run_start is None:
                    run_start = c
                elif not free and run_start is not None:
                    off = run_start << cb
                    end = min(c << cb, self.file.length)
                    if end > off:
                        try:
                            await self.file.discard(off, end - off)
                        except OSError as exc:
                            log.debug("discard of %#x failed: %s", off, exc)
                    run_start = None

    async def flush(self) -> None:
        if self.map is None or self.node.read_only:
            return
        async with self.lock:
            await self._sync_metadata()
        await self.sync()

    # -- lookups -------------------------------------------------------------------------------
    async def _runs(self, offset: int, end: int) -> list[_Run]:
        """How to read [offset, end) as far as the L2 table of *offset* reaches.

        Caller holds the lock. Runs merge clusters of the same kind (NORMAL only when the
        host clusters follow each other).
        """
        m = self._m
        cb = self.cluster_bits
        cs = self.cluster_size
        c0 = offset >> cb
        table_end = ((c0 >> m.l2_bits) + 1) << m.l2_bits
        c1 = min(-(-end >> cb), table_end)
        ents = await m.entries(c0, c1 - c0)
        runs: list[_Run] = []
        pos = offset
        for i, e in enumerate(ents):
            cstart = (c0 + i) << cb
            cend = min(cstart + cs, end)
            kind = cluster_type(e)
            if kind >= ZERO_PLAIN and self._v2:
                raise _v2_zero_error(cstart)
            host = 0
            if kind in (NORMAL, ZERO_ALLOC):
                host = e & L2E_OFFSET_MASK
                if host & (cs - 1):
                    raise OSError(
                        errno.EIO, f"qcow2: cluster offset {host:#x} unaligned (guest {cstart:#x})"
                    )
                host += pos - cstart
            elif kind == COMPRESSED:
                host = e
            if kind == ZERO_ALLOC:
                kind = ZERO_PLAIN
            last = runs[-1] if runs else None
            if (
                last is not None
                and last.kind == kind
                and kind != COMPRESSED
                and (kind != NORMAL or last.host + last.length == host)
            ):
                last.length += cend - pos
            else:
                runs.append(_Run(kind, pos, cend - pos, host))
            pos = cend
        return runs

    # -- reads ---------------------------------------------------------------------------------
    def getlength(self) -> int:
        return self.size

    async def preadv(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        self._reads += 1
        try:
            end = offset + nbytes
            out: bytearray | None = None
            pos = offset
            while pos < end:
                async with self.lock:
                    runs = await self._runs(pos, end)
                if out is None and len(runs) == 1 and runs[0].length == nbytes:
                    return await self._read_run(runs[0])
                if out is None:
                    out = bytearray(nbytes)
                for run in runs:
                    if run.kind != ZERO_PLAIN:
                        data = await self._read_run(run)
                        out[run.offset - offset : run.offset - offset + run.length] = data
                    pos = run.offset + run.length
            return out if out is not None else b""
        finally:
            self._reads -= 1

    async def _read_run(self, run: _Run) -> bytes | bytearray | memoryview:
        if run.kind == NORMAL:
            return await self._read_file(run.host, run.length)
        if run.kind == ZERO_PLAIN:
            return bytes(run.length)
        if run.kind == UNALLOCATED:
            return await self._read_backing(run.offset, run.length)
        data = await self._read_compressed(run.host)
        start = run.offset & (self.cluster_size - 1)
        return memoryview(data)[start : start + run.length]

    async def _read_backing(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        back = self.node.backing
        if back is None:
            return bytes(nbytes)
        return await read_zero_padded(back, offset, nbytes)

    async def _read_compressed(self, entry: int) -> bytes:
        cached = self._dcache
        if cached is not None and cached[0] == entry:
            return cached[1]
        assert self.layout is not None and self.hdr is not None
        coffset, csize, _ = self.layout.parse(entry)
        raw = await self._read_file(coffset, csize)
        data = await run_blocking(
            compress.decompress, self.hdr.compression_type, raw, self.cluster_size
        )
        self._dcache = (entry, data)
        return data

    async def _read_old_cluster(self, cluster: int, entry: int) -> bytes | bytearray | memoryview:
        """A cluster's current contents, for copy-on-write into its new host cluster."""
        kind = cluster_type(entry)
        cs = self.cluster_size
        start = cluster << self.cluster_bits
        if kind in (ZERO_PLAIN, ZERO_ALLOC):
            return bytes(cs)
        if kind == UNALLOCATED:
            return await self._read_backing(start, cs)
        if kind == COMPRESSED:
            return await self._read_compressed(entry)
        host = entry & L2E_OFFSET_MASK
        if host & (cs - 1):
            raise OSError(errno.EIO, f"qcow2: cluster offset {host:#x} unaligned")
        return await self._read_file(host, cs)

    # -- writes --------------------------------------------------------------------------------
    async def pwritev(self, offset: int, data: memoryview, flags: WriteFlags) -> None:
        if flags & WriteFlags.COMPRESSED:
            await self._write_compressed(offset, data)
        else:
            await self._write(offset, data)
        if flags & WriteFlags.FUA:
            await self.flush()

    async def _wait_inflight(self, c0: int, c1: int) -> bool:
        """Wait (dropping the lock) for allocations on guest clusters [c0, c1); True when it
        had to wait, so the caller looks at the L2 entries again."""
        for a, b, ev in self._inflight:
            if a < c1 and c0 < b:
                self.lock.release()
                try:
                    await ev.wait()
                finally:
                    await self.lock.acquire()
                return True
        return False

    async def _write(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        pos = offset
        while pos < end:
            pos += await self._write_step(pos, data[pos - offset :], end)

    async def _write_step(self, pos: int, data: memoryview, end: int) -> int:
        """Write the leading run of [pos, end) that is either overwritten in place or newly
        allocated in one piece; returns the bytes done."""
        m = self._m
        cb = self.cluster_bits
        cs = self.cluster_size
        async with self.lock:
            c0 = pos >> cb
            c_max = min(-(-end >> cb), c0 + _MAX_STEP_CLUSTERS)
            while await self._wait_inflight(c0, c_max):
                pass
            # Entries table by table, while the leading run keeps going.
            ents: list[int] = []
            inplace = False
            host = ents_host = 0
            n = 0
            c = c0
            while c < c_max:
                stop = min(c_max, ((c >> m.l2_bits) + 1) << m.l2_bits)
                ents.extend(await m.entries(c, stop - c))
                if n == 0:  # the first table: the leading cluster decides the kind of run
                    inplace = writable_in_place(ents[0])
                    ents_host = ents[0] & L2E_OFFSET_MASK
                while (
                    n < len(ents)
                    and writable_in_place(ents[n]) == inplace
                    and (not inplace or (ents[n] & L2E_OFFSET_MASK) == ents_host + n * cs)
                ):
                    n += 1
                if n < len(ents):
                    break
                c = stop
            if inplace:
                host = ents_host
                if host & (cs - 1):
                    raise OSError(errno.EIO, f"qcow2: cluster offset {host:#x} unaligned")
                nbytes = min(end, (c0 + n) << cb) - pos
                hoff = host + (pos & (cs - 1))
                self._check_data_overlap(hoff, nbytes)
            else:
                for l1i in range(c0 >> m.l2_bits, ((c0 + n - 1) >> m.l2_bits) + 1):
                    await m.writable_table(l1i)
                host, n = await self._r.alloc_upto(n)
                ev = asyncio.Event()
                slot = (c0, c0 + n, ev)
                self._inflight.append(slot)
        if inplace:
            await self._write_file(hoff, data[:nbytes])
            return nbytes
        return await self._write_allocated(pos, data, end, c0, n, host, tuple(ents[:n]), slot)

    async def _write_allocated(
        self,
        pos: int,
        data: memoryview,
        end: int,
        c0: int,
        n: int,
        host: int,
        old: tuple[int, ...],
        slot: tuple[int, int, asyncio.Event],
    ) -> int:
        cb = self.cluster_bits
        cs = self.cluster_size
        run_start = c0 << cb
        run_end = (c0 + n) << cb
        wend = min(end, run_end)
        nbytes = wend - pos
        head = pos - run_start
        tail = run_end - wend
        ok = False
        try:
            if head or tail:
                buf = bytearray(n * cs)
                first = await self._read_old_cluster(c0, old[0]) if head else b""
                if head:
                    buf[:head] = memoryview(first)[:head]
                if tail:
                    if n == 1 and head:
                        last = first
                    else:
                        last = await self._read_old_cluster(c0 + n - 1, old[-1])
                    buf[n * cs - tail :] = memoryview(last)[cs - tail :]
                buf[head : head + nbytes] = data[:nbytes]
                await self._write_file(host, buf)
            else:
                await self._write_file(host, data[:nbytes])
            async with self.lock:
                m = self._m
                cur = await m.entries_span(c0, n)
                await m.set_entries_span(c0, [(host + i * cs) | OFLAG_COPIED for i in range(n)])
                for e in cur:
                    self._free_entry(e)
                ok = True
                await self._sync_if_many_frees()
        finally:
            if not ok:
                # Nothing references the new clusters: give them back at once.
                async with self.lock:
                    await self._unref_bytes([(host, n * cs)])
            self._inflight.remove(slot)
            slot[2].set()
        return nbytes

    # -- compressed writes ---------------------------------------------------------------------
    async def _write_compressed(self, offset: int, data: memoryview) -> None:
        """Store whole clusters compressed (QEMU's qcow2_co_pwritev_compressed_part).

        The request covers whole clusters, or ends at the end of the image, whose last
        cluster is padded with zeroes. A cluster that does not compress to less than a
        cluster is written the ordinary way instead. As in QEMU 7.2, a cluster that has host
        space already (data, allocated zeroes, compressed data) cannot take compressed data:
        EIO.
        """
        cs = self.cluster_size
        cb = self.cluster_bits
        end = offset + len(data)
        if offset & (cs - 1) or (len(data) & (cs - 1) and end != self.size):
            raise OSError(errno.EINVAL, "qcow2: compressed writes must cover whole clusters")
        assert self.hdr is not None
        m = self._m
        per_step = max(1, _MAX_COMPRESSED_STEP >> cb)
        pos = offset
        while pos < end:
            c0 = pos >> cb
            table_end = ((c0 >> m.l2_bits) + 1) << m.l2_bits
            stop = min(end, min(table_end, c0 + per_step) << cb)
            packed = await run_blocking(
                compress.compress_clusters,
                self.hdr.compression_type,
                data[pos - offset : stop - offset],
                cs,
            )
            await self._store_compressed(c0, packed)
            # Clusters that did not shrink, in runs, through the normal write path.
            i = 0
            while i < len(packed):
                if packed[i] is not None:
                    i += 1
                    continue
                j = i
                while j < len(packed) and packed[j] is None:
                    j += 1
                a = pos + i * cs
                b = min(stop, pos + j * cs)
                await self._write(a, data[a - offset : b - offset])
                i = j
            pos = stop

    async def _store_compressed(self, c0: int, packed: list[bytes | None]) -> None:
        """Allocate room for the compressed clusters of guest clusters [c0, c0+len(packed))
        (one L2 table), write the data, then point the L2 entries at it. Entries that are
        None are left alone."""
        idx = [i for i, p in enumerate(packed) if p is not None]
        if not idx:
            return
        m, r = self._m, self._r
        cb = self.cluster_bits
        n = len(packed)
        assert self.layout is not None
        allocs: list[tuple[int, int]] = []
        descs: list[int] = []
        async with self.lock:
            while await self._wait_inflight(c0, c0 + n):
                pass
            ents = await m.entries(c0, n)
            for i in idx:
                if ents[i] & L2E_OFFSET_MASK:
                    raise OSError(
                        errno.EIO,
                        f"qcow2: compressed write to allocated cluster at {(c0 + i) << cb:#x}",
                    )
            await m.writable_table(c0 >> m.l2_bits)
            try:
                for i in idx:
                    size = len(packed[i] or b"")
                    host = await r.alloc_bytes(size)
                    allocs.append((host, size))
                    self._check_data_overlap(host, size)
                    descs.append(self.layout.entry(host, size))
            except BaseException:
                await self._unref_bytes(allocs)
                raise
            slot = (c0, c0 + n, asyncio.Event())
            self._inflight.append(slot)
        ok = False
        try:
            # The data first, one write per run of back-to-back allocations.
            k = 0
            while k < len(allocs):
                start = allocs[k][0]
                buf = bytearray(packed[idx[k]] or b"")
                k += 1
                while k < len(allocs) and allocs[k][0] == allocs[k - 1][0] + allocs[k - 1][1]:
                    buf += packed[idx[k]] or b""
                    k += 1
                await self._write_file(start, buf)
            async with self.lock:
                cur = await m.entries(c0, n)
                new = list(cur)
                for k, i in enumerate(idx):
                    new[i] = descs[k]
                await m.set_entries(c0, new)
                for i in idx:
                    self._free_entry(cur[i])
                ok = True
                await self._sync_if_many_frees()
        finally:
            if not ok:
                # Nothing references the new bytes: drop their references at once.
                async with self.lock:
                    await self._unref_bytes(allocs)
            self._inflight.remove(slot)
            slot[2].set()

    async def _unref_bytes(self, allocs: list[tuple[int, int]]) -> None:
        """Give back the references :meth:`RefcountManager.alloc_bytes` took. Caller holds
        the lock."""
        cb = self.cluster_bits
        for host, size in allocs:
            first = host >> cb
            try:
                await self._r.update(first, ((host + size - 1) >> cb) - first + 1, -1)
            except OSError:
                pass

    def _free_entry(self, entry: int, discard: bool = False) -> None:
        """Queue the release of whatever host space an L2 entry being replaced held."""
        kind = cluster_type(entry)
        if kind in (NORMAL, ZERO_ALLOC):
            host = entry & L2E_OFFSET_MASK
            if not host & (self.cluster_size - 1):
                self._queue_free(host, self.cluster_size, discard)
        elif kind == COMPRESSED:
            assert self.layout is not None
            start, length = self.layout.host_range(entry)
            self._queue_free(start, length, discard)

    # -- zeroes and discard --------------------------------------------------------------------
    def _aligned_part(self, offset: int, end: int) -> tuple[int, int]:
        """The whole clusters inside [offset, end); a range reaching the end of the image
        also takes the partial last cluster."""
        cs = self.cluster_size
        a0 = -(-offset // cs) * cs
        a1 = end // cs * cs
        if end >= self.size and end % cs:
            a1 = -(-end // cs) * cs
        return a0, a1

    async def pwrite_zeroes(self, offset: int, nbytes: int, flags: WriteFlags) -> None:
        end = offset + nbytes
        a0, a1 = self._aligned_part(offset, end)
        assert self.hdr is not None
        if a0 >= a1:
            await self._zero_partial(offset, end, flags)
        else:
            if offset < a0:
                await self._zero_partial(offset, a0, flags)
            if self.hdr.version >= 3:
                await self._zero_clusters(a0 >> self.cluster_bits, a1 - a0, flags, False)
            elif self.node.backing is None:
                # v2 has no zero flag, but without a backing file an unallocated cluster
                # reads as zeroes: QEMU 7.2 deallocates here whether or not MAY_UNMAP is set.
                await self._zero_clusters(a0 >> self.cluster_bits, a1 - a0, flags, True)
            else:
                await self._write_real_zeroes(a0, min(a1, end), flags)
            if min(a1, end) < end:
                await self._zero_partial(a1, end, flags)
        if flags & WriteFlags.FUA:
            await self.flush()

    async def _zero_partial(self, offset: int, end: int, flags: WriteFlags) -> None:
        """Part of one cluster: nothing to do if it already reads as zeroes, else real
        zeroes (QEMU's is_zero() shortcut, then the fallback)."""
        async with self.lock:
            runs = await self._runs(offset, end)
        back = self.node.backing
        if all(
            r.kind == ZERO_PLAIN
            or (r.kind == UNALLOCATED and (back is None or r.offset >= back.length))
            for r in runs
        ):
            return
        await self._write_real_zeroes(offset, end, flags)

    async def _write_real_zeroes(self, offset: int, end: int, flags: WriteFlags) -> None:
        if flags & WriteFlags.NO_FALLBACK:
            raise OSError(errno.ENOTSUP, "qcow2: fast zeroing not possible here")
        zero = memoryview(bytes(min(end - offset, 4 * MiB)))
        pos = offset
        while pos < end:
            n = min(len(zero), end - pos)
            await self._write(pos, zero[:n])
            pos += n

    async def _zero_clusters(self, c0: int, nbytes: int, flags: WriteFlags, dealloc: bool) -> None:
        """Mark whole clusters zero (v3) or unallocated (*dealloc*), table by table."""
        unmap_all = bool(flags & WriteFlags.MAY_UNMAP)

        def zeroed(e: int) -> int:
            if dealloc:
                self._free_entry(e, discard=True)
                return 0
            if cluster_type(e) in (NORMAL, ZERO_ALLOC) and not unmap_all and e & OFLAG_COPIED:
                return (e & L2E_OFFSET_MASK) | OFLAG_COPIED | OFLAG_ZERO
            self._free_entry(e, discard=unmap_all)
            return OFLAG_ZERO

        await self._rewrite_entries(
            c0, c0 + (nbytes >> self.cluster_bits), zeroed, skip_missing_table=lambda: dealloc
        )

    async def pdiscard(self, offset: int, nbytes: int) -> None:
        end = offset + nbytes
        a0, a1 = self._aligned_part(offset, end)
        if a0 >= a1:
            return  # discard is advisory: partial clusters stay as they are
        assert self.hdr is not None
        v3 = self.hdr.version >= 3
        if not v3 and self.node.backing is not None:
            return  # without the zero flag, discarding would expose the backing file's data

        def discarded(e: int) -> int:
            if cluster_type(e) == UNALLOCATED and self.node.backing is None:
                return e
            self._free_entry(e, discard=True)
            return OFLAG_ZERO if v3 else 0

        await self._rewrite_entries(
            a0 >> self.cluster_bits,
            a1 >> self.cluster_bits,
            discarded,
            skip_missing_table=lambda: not (v3 and self.node.backing is not None),
        )

    async def _rewrite_entries(
        self,
        c: int,
        cend: int,
        new_entry: Callable[[int], int],
        skip_missing_table: Callable[[], bool],
    ) -> None:
        """Replace the L2 entries of guest clusters [c, cend) by ``new_entry(old)`` (which
        queues the release of what it drops), table by table under the lock; tables not
        allocated yet are left alone when ``skip_missing_table()`` says so."""
        m = self._m
        while c < cend:
            async with self.lock:
                c_stop = min(cend, ((c >> m.l2_bits) + 1) << m.l2_bits)
                while await self._wait_inflight(c, c_stop):
                    pass
                if not m.l2_offset(c >> m.l2_bits) and skip_missing_table():
                    c = c_stop
                    continue
                ents = await m.entries(c, c_stop - c)
                new = [new_entry(e) for e in ents]
                if list(ents) != new:
                    await m.set_entries(c, new)
                await self._sync_if_many_frees()
                c = c_stop

    # -- status --------------------------------------------------------------------------------
    async def block_status(self, offset: int, nbytes: int) -> Extent:
        """The first run of same-kind clusters from *offset*. Hot in sparse backups and NBD
        block status, so runs are measured in C-speed slices (``any``, tuple compares), not
        entry by entry."""
        cb = self.cluster_bits
        cs = self.cluster_size
        async with self.lock:
            m = self._m
            c0 = offset >> cb
            table_end = ((c0 >> m.l2_bits) + 1) << m.l2_bits
            c1 = min(-(-(offset + nbytes) >> cb), table_end)
            ents = await m.entries(c0, c1 - c0)
        e0 = ents[0]
        kind = cluster_type(e0)
        if kind >= ZERO_PLAIN and self._v2:
            raise _v2_zero_error(offset)
        within = offset & (cs - 1)
        if kind == COMPRESSED:
            n = 1
        elif kind == NORMAL:
            if e0 & L2E_OFFSET_MASK & (cs - 1):
                raise OSError(
                    errno.EIO, f"qcow2: cluster offset {e0:#x} unaligned (guest {offset:#x})"
                )
            n = _run_length(ents, lambda a, b: tuple(range(e0 + a * cs, e0 + b * cs, cs)))
        elif kind == UNALLOCATED:
            n = _zero_prefix(ents)
        elif kind == ZERO_ALLOC:
            n = 1  # allocated zero clusters one by one, so the host offset stays exact
        else:
            n = _run_length(ents, lambda a, b: (e0,) * (b - a))
        length = min(n * cs - within, nbytes)
        if kind == UNALLOCATED:
            return Extent(offset, length, BlockStatus(0))
        if kind == ZERO_PLAIN:
            return Extent(offset, length, BlockStatus.ZERO | BlockStatus.ALLOCATED)
        if kind == ZERO_ALLOC:
            host = (e0 & L2E_OFFSET_MASK) + within
            return Extent(
                offset,
                length,
                BlockStatus.ZERO | BlockStatus.ALLOCATED | BlockStatus.OFFSET_VALID,
                map_node=self.file,
                map_offset=host,
            )
        if kind == COMPRESSED:
            return Extent(offset, length, BlockStatus.DATA | BlockStatus.ALLOCATED)
        return Extent(
            offset,
            length,
            BlockStatus.DATA | BlockStatus.ALLOCATED | BlockStatus.OFFSET_VALID,
            map_node=self.file,
            map_offset=(e0 & L2E_OFFSET_MASK) + within,
        )

    # -- resize --------------------------------------------------------------------------------
    async def truncate(self, size: int, exact: bool, prealloc: str) -> None:
        if size % 512:
            raise QmpError("The new size must be a multiple of 512")
        old = self.size
        if prealloc not in ("off", "metadata", "falloc", "full"):
            raise QmpError(f"Unsupported preallocation mode '{prealloc}'")
        if size == old:
            return
        self.bitmaps.check_resize()
        if size < old:
            if prealloc != "off":
                raise QmpError("Preallocation can't be used for shrinking an image")
            await self._shrink(size)
            return
        await self._grow(size, exact=True)
        if prealloc != "off":
            await self.preallocate_metadata(old, size, file_prealloc=prealloc)
        back = self.node.backing
        if back is not None and back.length > old:
            # The new area must read as zeroes, not as what the backing has there.
            await self.pwrite_zeroes(old, min(size, back.length) - old, WriteFlags.NONE)

    async def _shrink(self, size: int) -> None:
        """QEMU's qcow2 shrink: every cluster past the new end is released (its entry
        becomes unallocated), L2 tables wholly past it go, then the header's size changes.
        The L1 table keeps its length. A crash in between leaves the old size and at worst
        leaked clusters, never an entry pointing at freed space."""
        cs, m = self.cluster_size, self._m
        per_table = cs << m.l2_bits
        tables = -(-size // per_table)
        first, last = -(-size // cs), min(-(-self.size // cs), tables << m.l2_bits)

        def dropped(entry: int) -> int:
            self._free_entry(entry, discard=True)
            return 0

        if first < last:
            await self._rewrite_entries(first, last, dropped, skip_missing_table=lambda: True)
        async with self.lock:
            await m.drop_tables(tables, lambda e: self._free_entry(e, discard=True))
            await self._sync_metadata(force_frees=True)
            await self.sync()
            await self.write_header(OFF_SIZE, struct.pack(">Q", size))
            await self.sync()
            assert self.hdr is not None
            self.hdr.size = size
            self.size = size

    async def _grow(self, size: int, exact: bool) -> None:
        m = self._m
        async with self.lock:
            await self._sync_metadata(force_frees=True)
            need = -(-size // (self.cluster_size << m.l2_bits))
            if need > m.l1_size:
                try:
                    await m.grow_l1(need, exact)
                except OSError as exc:
                    raise QmpError(f"Failed to grow the L1 table: {exc.strerror}") from None
            await self.write_header(OFF_SIZE, struct.pack(">Q", size))
            await self.sync()
            assert self.hdr is not None
            self.hdr.size = size
            self.size = size

    async def preallocate_metadata(self, start: int, end: int, file_prealloc: str = "off") -> None:
        """Give every guest cluster in [start, end) a host cluster (QEMU's preallocate_co
        for ``preallocation=metadata``): L2 table, then that table's data clusters; the file
        then grows to cover them (``falloc``/``full`` also reserve or write that space)."""
        m = self._m
        cb = self.cluster_bits
        c = start >> cb
        cend = -(-end >> cb)
        last_end = 0
        while c < cend:
            async with self.lock:
                c_stop = min(cend, ((c >> m.l2_bits) + 1) << m.l2_bits)
                ents = await m.entries(c, c_stop - c)
                todo = [i for i, e in enumerate(ents) if cluster_type(e) == UNALLOCATED]
                if todo:
                    await m.writable_table(c >> m.l2_bits)
                    # Runs of unallocated clusters get one contiguous host run each.
                    i = 0
                    while i < len(todo):
                        j = i + 1
                        while j < len(todo) and todo[j] == todo[j - 1] + 1:
                            j += 1
                        host = await self._r.alloc(j - i)
                        await m.set_entries(
                            c + todo[i],
                            [(host + k * self.cluster_size) | OFLAG_COPIED for k in range(j - i)],
                        )
                        last_end = max(last_end, host + (j - i) * self.cluster_size)
                        i = j
                c = c_stop
        async with self.lock:
            await self._sync_metadata()
            if file_prealloc != "off":
                await self._trim_file()
            if last_end > self.file.length:
                await self.file.truncate(last_end, prealloc=file_prealloc)
            self._written_end = max(self._written_end, last_end)

    # -- reporting -----------------------------------------------------------------------------
    def filename(self) -> str:
        if "file" in self.node.children:
            name = str(self.file.filename)
            back = self.node.backing
            expected = self.auto_backing_file or ""
            overridden = expected != back.filename if back is not None else bool(expected)
            if overridden and not name.startswith("json:"):
                # QEMU's bdrv_refresh_filename: a backing other than the one the image
                # names (or none) changes what the image means, so the filename becomes a
                # json: description of the options.
                return json_name(
                    {
                        "backing": open_options(back) if back is not None else None,
                        "driver": "qcow2",
                        "file": open_options(self.file),
                    }
                )
            return name
        return super().filename()

    def image_info(self) -> dict[str, Any]:
        hdr = self.hdr
        if hdr is None:
            return {}
        data: dict[str, Any]
        if hdr.version >= 3:
            data = {
                "compat": "1.1",
                "compression-type": COMPRESSION_NAMES.get(hdr.compression_type, "zlib"),
                "lazy-refcounts": bool(hdr.compatible_features & COMPAT_LAZY_REFCOUNTS),
                "refcount-bits": hdr.refcount_bits,
                "corrupt": bool(hdr.incompatible_features & INCOMPAT_CORRUPT),
                "extended-l2": False,
            }
        else:
            data = {
                "compat": "0.10",
                "compression-type": "zlib",
                "refcount-bits": hdr.refcount_bits,
            }
        if hdr.version >= 3 and self.bitmaps.entries:
            data["bitmaps"] = self.bitmaps.info()
        info: dict[str, Any] = {
            "cluster-size": hdr.cluster_size,
            "dirty-flag": bool(hdr.incompatible_features & INCOMPAT_DIRTY),
            "format-specific": {"type": "qcow2", "data": data},
        }
        if self.backing_file_name:
            info["backing-filename"] = self.backing_file_name
            if self.full_backing_file_name:
                info["full-backing-filename"] = self.full_backing_file_name
        if self.backing_format:
            info["backing-filename-format"] = self.backing_format
        return info

    def actual_size(self) -> int | None:
        if "file" not in self.node.children:
            return None
        return self.file.driver.actual_size()

    def has_zero_init(self) -> bool:
        return self.node.backing is None

    # -- blockdev-create -----------------------------------------------------------------------
    @staticmethod
    async def create(options: Any, graph: BlockGraph) -> None:
        from blockd.block.drivers.qcow2.create import create_image

        await create_image(options, graph)


_SLICE = 64


def _v2_zero_error(guest: int) -> OSError:
    """Version 2 has no zero clusters: QEMU fails such a request (and calls the image
    corrupt) rather than guess what the bit means."""
    return OSError(errno.EIO, f"qcow2: zero cluster entry in a version 2 image (guest {guest:#x})")


def _zero_prefix(ents: tuple[int, ...]) -> int:
    """How many entries from the start are 0 (unallocated)."""
    n = len(ents)
    a = 0
    while a < n:
        b = min(n, a + _SLICE)
        if any(ents[a:b]):
            for i in range(a, b):
                if ents[i]:
                    return i
        a = b
    return n


def _run_length(ents: tuple[int, ...], expect: Any) -> int:
    """How many entries from the start equal ``expect(a, b)`` slice by slice (a run of
    contiguous data clusters, or of identical zero entries)."""
    n = len(ents)
    a = 0
    while a < n:
        b = min(n, a + _SLICE)
        want = expect(a, b)
        if ents[a:b] != want:
            for i in range(a, b):
                if ents[i] != want[i - a]:
                    return max(i, 1)
        a = b
    return n


def _merge_clusters(frees: list[tuple[int, int]], cluster_bits: int) -> list[tuple[int, int]]:
    """Byte ranges to (first cluster, count) runs, adjacent runs joined. Overlapping ranges
    stay apart: two compressed clusters sharing a host cluster each hold a reference."""
    runs = sorted(
        (off >> cluster_bits, ((off + n - 1) >> cluster_bits) - (off >> cluster_bits) + 1)
        for off, n in frees
    )
    out: list[tuple[int, int]] = []
    for first, count in runs:
        if out and out[-1][0] + out[-1][1] == first:
            out[-1] = (out[-1][0], out[-1][1] + count)
        else:
            out.append((first, count))
    return out
