"""The vmdk format driver (QEMU's block/vmdk.c): opening every layout QEMU opens, reads,
block status and what ``query-named-block-nodes`` shows; writes are in write.py.

A vmdk node's ``file`` is either a sparse file holding the whole disk (with its descriptor
embedded at sector 1) or a text descriptor naming extent files. Extents and the parent image
(``parentFileNameHint``) are named relative to the descriptor and opened through the node's
protocol (:func:`blockd.block.probe.sibling`), so the same code serves local files and any
protocol that can name neighbouring files.

The order of checks at open is QEMU's, so that an image QEMU refuses is refused here with
the same text: extents in descriptor order, then the parent hint, the CID and parentCID, then
the backing file.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import json
from typing import TYPE_CHECKING, Any

from blockd.block.driver import BlockDriver, WriteFlags, register_driver
from blockd.block.drivers.metacache import read_zero_padded
from blockd.block.drivers.vmdk import descriptor as desc
from blockd.block.drivers.vmdk.extent import (
    DATA,
    ERROR,
    MAX_LENGTH,
    UNALLOC,
    ZEROED,
    Extent,
    FlatExtent,
    Run,
    ZeroExtent,
    check_request,
    to_int64,
)
from blockd.block.drivers.vmdk.sesparse import NO_WRITE, open_sesparse
from blockd.block.drivers.vmdk.sparse import (
    VMDK3_MAGIC,
    VMDK4_MAGIC,
    SparseExtent,
    grain_size_refusal,
    open_vmdk3,
    open_vmdk4,
)
from blockd.block.drivers.vmdk.write import Writer
from blockd.block.perm import ChildRole
from blockd.block.probe import full_name, open_backing, sibling
from blockd.block.status import BlockStatus
from blockd.block.status import Extent as Status
from blockd.errors import QmpError, errno_of, strerror

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph
    from blockd.block.node import BlockNode

#: Descriptors embedded in sparse files that point to more of them: QEMU recurses without
#: bound (a file naming itself exhausts its stack); blockd stops here.
MAX_NESTING = 8


@register_driver
class VmdkDriver(BlockDriver):
    format_name = "vmdk"
    is_format = True
    supports_backing = True
    can_create = True
    # QEMU's vmdk takes compressed writes; only streamOptimized extents store them compressed.
    supports_compressed_writes = True

    @classmethod
    def probe(cls, buf: bytes, filename: str) -> int:
        if len(buf) < 4:
            return 0
        if buf[:4] in (VMDK3_MAGIC, VMDK4_MAGIC):
            return 100
        return 100 if desc.probe_text(buf) else 0

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self.extents: list[Extent] = []
        self._ends: list[int] = []
        self.create_type: str | None = None
        self.desc_offset = 0
        self.cid = 0
        self.parent_cid = 0
        self.cid_checked = False
        self.backing_format: str | None = None
        self.full_backing_file_name: str | None = None
        self._backing_null = False
        self._backing_given = False
        #: Files holding metadata (the descriptor or sparse file, sparse extents).
        self._meta_files: set[str] = set()
        #: QEMU's s->lock: table lookups and every metadata change (data I/O runs outside).
        self.lock = asyncio.Lock()
        self.writer = Writer(self)

    @property
    def file(self) -> BlockNode:
        return self.node.children["file"].node

    # -- open ------------------------------------------------------------------------------
    async def open(self, options: Any, graph: BlockGraph) -> None:
        await graph.open_child(self.node, options.file, "file", ChildRole.image())
        file = self.file
        self._meta_files.add(file.driver.identity())
        magic = await _read_start(file)
        if magic in (VMDK3_MAGIC, VMDK4_MAGIC):
            await self._open_sparse(file, magic, "", graph, 0)
            self.desc_offset = 0x200
        else:
            await self._open_descriptor(await _read_desc(file, 0), graph, 0)
        region = bytes(await read_zero_padded(file, self.desc_offset, desc.DESC_SIZE))
        hint = desc.parent_hint(region)
        cid = desc.read_cid(region, False)
        parent_cid = desc.read_cid(region, True)
        if hint is None or cid is None or parent_cid is None:
            raise QmpError(f"Could not open '{file.filename}': Invalid argument")
        self.cid, self.parent_cid = cid, parent_cid
        if hint:
            self.backing_file_name = desc.to_str(hint)
            self.backing_format = "vmdk"
            self.full_backing_file_name = full_name(file, self.backing_file_name)
        self._backing_null = await open_backing(
            self.node, graph, options, self.backing_file_name, self.backing_format
        )
        self._backing_given = "backing" in options.model_fields_set
        # blockd's own refusals come last, so that an image QEMU refuses gets QEMU's words.
        self._check_size()
        self._check_grains(self.node.read_only)
        sparse = [e for e in self.extents if isinstance(e, SparseExtent)]
        for e in sparse:
            e.share_caches(len(sparse))
        grains = [e.cluster_size for e in self.extents if not e.flat]
        self.limits.pwrite_zeroes_alignment = max(grains, default=0)

    async def _open_sparse(
        self, file: BlockNode, magic: bytes, kind: str, graph: BlockGraph, depth: int
    ) -> None:
        """A sparse file: an extent, or (VMDK4 with no capacity) one more descriptor."""
        if magic == VMDK3_MAGIC:
            self._add(await open_vmdk3(file, kind))
            return
        if magic != VMDK4_MAGIC:
            raise QmpError("Image not in VMDK format")
        ext, hdr = await open_vmdk4(file, kind, self.node.read_only, self.file)
        if ext is None:
            if depth >= MAX_NESTING:
                raise QmpError(
                    f"vmdk: descriptors nested deeper than {MAX_NESTING} levels in "
                    f"'{file.filename}'"
                )
            buf = await _read_desc(file, to_int64(hdr.desc_offset << 9))
            await self._open_descriptor(buf, graph, depth + 1)
            return
        if self.create_type is None:
            self.create_type = "monolithicSparse"
        if ext.compressed:
            self.create_type = "streamOptimized"
        self._add(ext)

    async def _open_descriptor(self, buf: bytes, graph: BlockGraph, depth: int) -> None:
        """A text descriptor (QEMU's vmdk_open_desc_file and vmdk_parse_extents)."""
        ct = desc.quoted_value(buf, b"createType", 128)
        if ct is None:
            raise QmpError("invalid VMDK image descriptor")
        if desc.to_str(ct) not in desc.CREATE_TYPES:
            raise QmpError(f"Unsupported image type '{desc.to_str(ct)}'")
        self.create_type = desc.to_str(ct)
        self.desc_offset = 0
        try:
            for line in desc.extent_lines(buf):
                await self._open_extent(line, graph, depth)
        except desc.InvalidLine as exc:
            raise QmpError(f"Invalid extent line: {desc.to_str(exc.line)}") from None

    async def _open_extent(self, line: desc.ExtentLine, graph: BlockGraph, depth: int) -> None:
        if line.kind == "ZERO":
            self._add(ZeroExtent(line.sectors))
            return
        name = desc.to_str(line.name)
        try:
            _full, file_opts = sibling(self.file, name)
        except QmpError:
            raise QmpError(
                f"Cannot use relative paths with VMDK descriptor file '{self.file.filename}': "
                f"Cannot generate a base directory for {self.file.drv} nodes"
            ) from None
        from blockd.qapi.base import ArgsValidator
        from blockd.qapi.block import BlockdevOptions

        flat = line.kind in ("FLAT", "VMFS")
        role = ChildRole.DATA if flat else ChildRole.DATA | ChildRole.METADATA
        opts = ArgsValidator(BlockdevOptions).validate(file_opts)
        # QEMU names the child after the number of extents so far; nested descriptors would
        # repeat a name there, so the number of extent files opened so far is used here.
        child = f"extents.{sum(1 for c in self.node.children if c.startswith('extents.'))}"
        edge = await graph.open_child(self.node, opts, child, role)
        node = edge.node
        if not flat and not self.node.read_only:
            # QEMU takes the write lock of every writable file with metadata as it opens it,
            # so a descriptor naming one sparse file twice fails there; without that, two
            # extents would allocate grains at the same place of one file.
            ident = node.driver.identity()
            if ident in self._meta_files:
                raise QmpError('Failed to get "write" lock')
            self._meta_files.add(ident)
        if flat:
            self._add(FlatExtent(line.kind, node, line.sectors, line.flat_offset))
        elif line.kind == "SESPARSE":
            self._apply_auto_read_only()
            self._add(await open_sesparse(node, line.kind))
        else:
            magic = await _read_start(node)
            await self._open_sparse(node, magic, line.kind, graph, depth)

    def _apply_auto_read_only(self) -> None:
        """QEMU's bdrv_apply_auto_read_only for seSparse: read-only, or refused."""
        if self.node.read_only:
            return
        if not self.node.auto_read_only:
            raise QmpError(NO_WRITE)
        self.node.read_only = True

    def _add(self, ext: Extent) -> None:
        ext.start = self._ends[-1] if self._ends else 0
        self.extents.append(ext)
        self._ends.append(ext.end)

    def _check_size(self) -> None:
        """QEMU keeps the size in sectors in an int64_t and fails on use when it does not fit
        BDRV_MAX_LENGTH; blockd refuses such an image at open."""
        if any(e.sectors < 0 for e in self.extents) or self.getlength() > MAX_LENGTH:
            raise QmpError(f"Could not open '{self.file.filename}': File too large")

    def _check_grains(self, read_only: bool) -> None:
        for e in self.extents:
            refusal = grain_size_refusal(e, read_only) if isinstance(e, SparseExtent) else None
            if refusal:
                raise QmpError(refusal)

    async def reopen(self, read_only: bool) -> None:
        if read_only or read_only == self.node.read_only:
            return
        if any(e.sesparse for e in self.extents):
            raise QmpError(NO_WRITE)
        for e in self.extents:
            if isinstance(e, SparseExtent) and e.version == 3 and not e.compressed:
                raise QmpError("VMDK version 3 must be read only")
        self._check_grains(False)

    # -- lookups ---------------------------------------------------------------------------
    def getlength(self) -> int:
        return self._ends[-1] if self._ends else 0

    def find(self, offset: int) -> Extent | None:
        i = bisect.bisect_right(self._ends, offset)
        return self.extents[i] if i < len(self.extents) else None

    async def runs(
        self, offset: int, end: int, first_only: bool = False
    ) -> tuple[Extent, list[Run]]:
        """The extent of *offset* and the runs of [offset, end) as far as one table goes."""
        ext = self.find(offset)
        if ext is None:
            raise OSError(errno.EIO, f"vmdk: no extent at {offset:#x}")
        async with self.lock:
            return ext, await ext.map(offset, ext.reach(end), first_only)

    async def cid_valid(self) -> bool:
        """Whether the parent is the image this delta was taken from (QEMU's
        vmdk_is_cid_valid): its CID, read from its descriptor now, is our parentCID."""
        back = self.node.backing
        if self.cid_checked or back is None:
            self.cid_checked = True
            return True
        if not isinstance(back.driver, VmdkDriver):
            return False
        cur = await back.driver.current_cid()
        if cur != self.parent_cid:
            return False
        self.cid_checked = True
        return True

    async def current_cid(self) -> int | None:
        try:
            region = bytes(await read_zero_padded(self.file, self.desc_offset, desc.DESC_SIZE))
        except OSError:
            return None
        return desc.read_cid(region, False)

    # -- reads -----------------------------------------------------------------------------
    async def preadv(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        end = offset + nbytes
        out: bytearray | None = None
        pos = offset
        while pos < end:
            ext, runs = await self.runs(pos, end)
            if out is None and len(runs) == 1 and runs[0].length == nbytes:
                return await self._read_run(ext, runs[0])
            if out is None:
                out = bytearray(nbytes)
            for run in runs:
                if run.kind != ZEROED:
                    data = await self._read_run(ext, run)
                    out[run.offset - offset : run.offset - offset + run.length] = data
                pos = run.offset + run.length
        return out if out is not None else b""

    async def _read_run(self, ext: Extent, run: Run) -> bytes | bytearray | memoryview:
        if run.kind == DATA:
            assert ext.file is not None
            if run.compressed:
                assert isinstance(ext, SparseExtent)
                within = (run.offset - ext.start) % ext.cluster_size
                return await ext.read_grain(run.host, within, run.length)
            check_request(run.host, run.length)
            return await read_zero_padded(ext.file, run.host, run.length)
        if run.kind == ZEROED:
            return bytes(run.length)
        return await self.read_backing(run.offset, run.length)

    async def read_backing(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        """What unallocated guest bytes read as: the parent's data (EINVAL when the parent
        is not the image the delta was taken from), or zeroes."""
        back = self.node.backing
        if back is None:
            return bytes(nbytes)
        if not await self.cid_valid():
            raise OSError(errno.EINVAL, "vmdk: parent CID does not match the image's parentCID")
        return await read_zero_padded(back, offset, nbytes)

    # -- writes (write.py) -----------------------------------------------------------------
    async def pwritev(self, offset: int, data: memoryview, flags: WriteFlags) -> None:
        await self.writer.write(offset, data)
        if flags & WriteFlags.FUA:
            await self.flush()

    async def pwrite_zeroes(self, offset: int, nbytes: int, flags: WriteFlags) -> None:
        await self.writer.write_zeroes(offset, nbytes, flags)
        if flags & WriteFlags.FUA:
            await self.flush()

    # -- status ----------------------------------------------------------------------------
    async def block_status(self, offset: int, nbytes: int) -> Status:
        ext, runs = await self.runs(offset, offset + nbytes, first_only=True)
        run = runs[0]
        if run.kind == ERROR:
            raise OSError(errno.EIO, f"vmdk: corrupt grain tables at {offset:#x}")
        if run.kind == UNALLOC:
            return Status(offset, run.length, BlockStatus(0))
        if run.kind == ZEROED:
            return Status(offset, run.length, BlockStatus.ZERO | BlockStatus.ALLOCATED)
        if run.compressed:
            return Status(offset, run.length, BlockStatus.DATA | BlockStatus.ALLOCATED)
        flags = BlockStatus.DATA | BlockStatus.ALLOCATED | BlockStatus.OFFSET_VALID
        length = run.length
        if ext.flat and ext.file is not None:
            # QEMU's BDRV_BLOCK_RECURSE: holes of a flat extent's file read as zeroes.
            if run.host >= ext.file.length:
                flags |= BlockStatus.ZERO
            else:
                below = await ext.file.block_status(run.host, length)
                if not below.flags & BlockStatus.DATA:
                    flags |= BlockStatus.ZERO
                length = min(length, below.length)
        return Status(offset, length, flags, map_node=ext.file, map_offset=run.host)

    # -- reporting -------------------------------------------------------------------------
    @property
    def backing_disabled(self) -> bool:
        return self._backing_null and bool(self.backing_file_name) and self.node.backing is None

    def filename(self) -> str:
        """The file's name, or (QEMU's bdrv_refresh_filename) a json: description when the
        ``backing`` option overrides the parent the descriptor names."""
        if "file" not in self.node.children:
            return super().filename()
        name = str(self.file.filename)
        back = self.node.backing
        # QEMU compares the name the image records with the name of a backing node the user
        # gave (an implicit one got the recorded name resolved, and counts as the same).
        if (
            name.startswith("json:")
            or not self.backing_file_name
            or not self._backing_given
            or (back is not None and back.filename == self.backing_file_name)
        ):
            return name
        desc: dict[str, Any] = {"driver": "vmdk", "file": _open_options(self.file)}
        desc["backing"] = _open_options(back) if back is not None else None
        return "json:" + json.dumps(desc, sort_keys=True)

    def image_info(self) -> dict[str, Any]:
        data = {
            "cid": self.cid,
            "parent-cid": self.parent_cid,
            "create-type": self.create_type or "",
            "extents": [e.info() for e in self.extents],
        }
        info: dict[str, Any] = {"format-specific": {"type": "vmdk", "data": data}}
        # QEMU's vmdk_co_get_info: only when every extent is of one kind.
        if self.extents and all(_same_kind(self.extents[0], e) for e in self.extents):
            if not self.extents[0].flat:
                info["cluster-size"] = self.extents[0].cluster_size
            info["dirty-flag"] = False
        if self.backing_file_name:
            info["backing-filename"] = self.backing_file_name
            if self.full_backing_file_name:
                info["full-backing-filename"] = self.full_backing_file_name
            info["backing-filename-format"] = self.backing_format
        return info

    def actual_size(self) -> int | None:
        if "file" not in self.node.children:
            return None
        total = self.file.driver.actual_size() or 0
        seen = {self.file}
        for e in self.extents:
            if e.file is not None and e.file not in seen:
                seen.add(e.file)
                total += e.file.driver.actual_size() or 0
        return total

    def has_zero_init(self) -> bool:
        return all(
            e.file.driver.has_zero_init() for e in self.extents if e.flat and e.file is not None
        )

    # -- blockdev-create -------------------------------------------------------------------
    @staticmethod
    async def create(options: Any, graph: BlockGraph) -> None:
        from blockd.block.drivers.vmdk.create import create_image

        await create_image(options, graph)


def _open_options(node: BlockNode) -> dict[str, Any]:
    return {k: v for k, v in node.options.items() if k != "node-name"}


def _same_kind(a: Extent, b: Extent) -> bool:
    return (
        a.flat == b.flat
        and a.compressed == b.compressed
        and (a.flat or a.cluster_size == b.cluster_size)
    )


async def _read_start(file: BlockNode) -> bytes:
    """The first four bytes, after QEMU's size check of vmdk_read_desc."""
    if file.length < 4:
        raise QmpError("File is too small, not a valid image")
    return bytes(await read_zero_padded(file, 0, 4))


async def _read_desc(file: BlockNode, offset: int) -> bytes:
    """A descriptor: at most 1 MiB from *offset* (QEMU's vmdk_read_desc)."""
    size = file.length
    if size < 4:
        raise QmpError("File is too small, not a valid image")
    size = min(size, desc.MAX_DESC)
    try:
        check_request(offset, size)
        return bytes(await read_zero_padded(file, offset, size))
    except OSError as exc:
        raise QmpError(f"Could not read from file: {strerror(errno_of(exc))}") from None
