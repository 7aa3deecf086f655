"""Persistent dirty bitmaps in qcow2's bitmaps extension (docs/interop/qcow2.txt, "Bitmaps";
QEMU's block/qcow2-bitmap.c).

On disk: the header's bitmaps extension points to a *directory* of entries (name, granularity,
flags ``in_use``/``auto``, bitmap table); each bitmap table entry points to one cluster of
serialized bits (bit *i* of the bitmap is bit ``i % 8`` of byte ``i // 8``), or is 0 for a
cluster of zeroes (bit 0 set: ones).

Why things happen when they do:

* **Open read-write** loads every bitmap and at once marks the ones it loaded ``in_use`` in the
  image, by rewriting the directory's flags in place and flushing before any write is
  accepted. From then on the image's copy is stale, and the flag says so: after ``kill -9`` the
  next open finds ``in_use`` and reports the bitmap ``inconsistent`` instead of trusting it.
  A torn flag update is harmless (a bitmap not yet flagged is still exact), and nothing is
  allocated (on an image with damaged refcounts an allocation could land on live data). QEMU
  switches the whole extension off around that rewrite, so a crash there loses every bitmap.
  A bitmap already ``in_use`` at open is loaded without data, inconsistent, and kept so (in the
  image too) until it is removed.
* **Clean close** (and reopen read-only) writes each bitmap's bits to new clusters, then a new
  directory with ``in_use`` cleared, then the header, and only then frees the old clusters.
  Every step is ordered by a flush, so a crash at any point leaves the old directory (all
  ``in_use``: inconsistent, never wrong) or the new one (correct); never a mix.
* A bitmap frozen by a job is stored with its successor's bits merged in, so a close while a
  job still holds a bitmap loses no write.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from bitarray import bitarray

from blockd.bitmap.dirty import (
    DEFAULT,
    DirtyBitmap,
    bitmaps_of,
    find_bitmap,
    load_bitmap,
    release,
)
from blockd.block.drivers.qcow2.header import (
    AUTOCLEAR_BITMAPS,
    EXT_BITMAPS,
    BitmapsExtension,
    HeaderExtension,
    Qcow2Header,
)
from blockd.errors import QmpError

if TYPE_CHECKING:
    from blockd.block.drivers.qcow2.driver import Qcow2Driver

MAX_BITMAPS = 65535
MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_SIZE = 1023

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC
TYPE_DIRTY_TRACKING = 1

ENTRY_RESERVED_MASK = 0xFF000000000001FE
ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
ENTRY_ALL_ONES = 1

_ENTRY = struct.Struct(">QIIBBHI")  # table offset, table size, flags, type, gran bits, name, extra


@dataclass
class DirEntry:
    """One bitmap directory entry, as on disk."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    #: The bitmap table once read or written (blockd never changes a table in place).
    table: list[int] | None = field(default=None, compare=False, repr=False)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    def packed_size(self) -> int:
        return entry_size(self.name)


def entry_size(name: str) -> int:
    return (_ENTRY.size + len(_name_bytes(name)) + 7) & ~7


def _name_bytes(name: str) -> bytes:
    """Names read from an image may be any bytes (kept as surrogate escapes)."""
    return name.encode("utf-8", "surrogateescape")


def bitmap_bits(length: int, granularity: int) -> int:
    return -(-length // granularity)


def table_size_for(length: int, granularity: int, cluster_size: int) -> int:
    """Bitmap table entries for a bitmap of *length* bytes (QEMU serializes 64-bit words)."""
    nbytes = -(-bitmap_bits(length, granularity) // 64) * 8
    return -(-nbytes // cluster_size)


def check_table_entry(entry: int, cluster_size: int) -> bool:
    if entry & ENTRY_RESERVED_MASK:
        return False
    offset = entry & ENTRY_OFFSET_MASK
    return not offset or (not entry & ENTRY_ALL_ONES and offset % cluster_size == 0)


def constraints_error(length: int, cluster_size: int, name: str, granularity: int) -> str | None:
    """QEMU's check_constraints_on_bitmap texts, or None when the bitmap may be stored."""
    gbits = granularity.bit_length() - 1
    if gbits > MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
    if gbits < MIN_GRANULARITY_BITS:
        return f"Granularity is under minimum ({1 << MIN_GRANULARITY_BITS} bytes)"
    nbytes = -(-bitmap_bits(length, granularity) // 8)
    if nbytes > MAX_PHYS_SIZE or nbytes > MAX_TABLE_SIZE * cluster_size:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(_name_bytes(name)) > MAX_NAME_SIZE:
        return f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
    return None


def _entry_ok(e: DirEntry, type_: int, cluster_size: int, length: int) -> bool:
    """QEMU's check_dir_entry."""
    if (
        e.table_size == 0
        or e.table_offset == 0
        or e.table_offset % cluster_size
        or e.table_size > MAX_TABLE_SIZE
        or not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS
        or e.flags & RESERVED_FLAGS
        or len(_name_bytes(e.name)) > MAX_NAME_SIZE
        or type_ != TYPE_DIRTY_TRACKING
    ):
        return False
    phys = e.table_size * cluster_size
    if phys > MAX_PHYS_SIZE:
        return False
    return bool(e.flags & FLAG_IN_USE) or length <= (phys * 8) << e.granularity_bits


def parse_directory(buf: bytes, nb_bitmaps: int, cluster_size: int, length: int) -> list[DirEntry]:
    """Entries of a bitmap directory, validated as QEMU's bitmap_list_load does (its texts)."""
    out: list[DirEntry] = []
    pos = 0
    end = len(buf)
    while pos < end:
        if pos + _ENTRY.size > end:
            raise QmpError("Broken bitmap directory")
        if len(out) + 1 > nb_bitmaps:
            raise QmpError("More bitmaps found than specified in header extension")
        t_off, t_size, flags, type_, gbits, name_size, extra = _ENTRY.unpack_from(buf, pos)
        size = (_ENTRY.size + name_size + extra + 7) & ~7
        if pos + size > end:
            raise QmpError("Broken bitmap directory")
        if extra:
            raise QmpError("Bitmap extra data is not supported")
        raw = buf[pos + _ENTRY.size : pos + _ENTRY.size + name_size]
        name = raw.decode("utf-8", "surrogateescape")
        e = DirEntry(name, t_off, t_size, flags, gbits)
        if not _entry_ok(e, type_, cluster_size, length):
            raise QmpError(f"Bitmap '{name}' doesn't satisfy the constraints")
        out.append(e)
        pos += size
    if len(out) != nb_bitmaps:
        raise QmpError("Less bitmaps found than specified in header extension")
    return out


def pack_directory(entries: list[DirEntry]) -> bytes:
    out = bytearray()
    for e in entries:
        name = _name_bytes(e.name)
        out += _ENTRY.pack(
            e.table_offset,
            e.table_size,
            e.flags,
            TYPE_DIRTY_TRACKING,
            e.granularity_bits,
            len(name),
            0,
        )
        out += name
        out += bytes(-len(out) % 8)
    return bytes(out)


def parse_extension(ext: HeaderExtension, cluster_size: int) -> BitmapsExtension:
    """The bitmaps extension with QEMU's qcow2_read_extensions checks and texts."""
    if len(ext.data) != 24:
        raise QmpError("bitmaps_ext: Invalid extension length")
    nb, reserved, size, offset = struct.unpack(">IIQQ", ext.data)
    if reserved:
        raise QmpError("bitmaps_ext: Reserved field is not zero")
    if nb > MAX_BITMAPS:
        raise QmpError(
            f"bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of "
            f"{MAX_BITMAPS}"
        )
    if nb == 0:
        raise QmpError("found bitmaps extension with zero bitmaps")
    if offset % cluster_size:
        raise QmpError("bitmaps_ext: invalid bitmap directory offset")
    if size > MAX_DIRECTORY_SIZE:
        raise QmpError(
            f"bitmaps_ext: bitmap directory size ({size}) exceeds the maximum supported size "
            f"({MAX_DIRECTORY_SIZE})"
        )
    if size == 0:
        raise QmpError("Requested bitmap directory size is zero")
    return BitmapsExtension(nb, size, offset)


class BitmapStore:
    """The image's bitmap directory and the node's persistent bitmaps kept in step with it.

    **Runs in:** the event loop; image changes take the driver's metadata lock only around
    allocation and refcount changes, header rewrites take it themselves.
    """

    def __init__(self, drv: Qcow2Driver) -> None:
        self.drv = drv
        #: The directory as it is on disk now.
        self.entries: list[DirEntry] = []
        self.ext: BitmapsExtension | None = None

    # -- reading -----------------------------------------------------------------------------
    def meta_clusters(self) -> set[int]:
        """Directory and bitmap table clusters, for the data-write overlap check."""
        cb = self.drv.cluster_bits
        out: set[int] = set()
        if self.ext is not None:
            out.update(_clusters(self.ext.directory_offset, self.ext.directory_size, cb))
        for e in self.entries:
            out.update(_clusters(e.table_offset, e.table_size * 8, cb))
        return out

    async def open(self) -> None:
        """Read the directory and load every bitmap into the node (QEMU's
        qcow2_load_dirty_bitmaps); on a read-write node mark them in use in the image."""
        drv = self.drv
        hdr = drv.hdr
        assert hdr is not None
        ext = hdr.extension(EXT_BITMAPS)
        if ext is None:
            return
        if hdr.version < 3 or not hdr.autoclear_features & AUTOCLEAR_BITMAPS:
            # Someone without bitmap support changed the image: the bitmaps may be stale.
            # QEMU drops them (with a warning); so does blockd, at the next header update.
            drv.log_warning(
                "a program lacking bitmap support modified this file, so all bitmaps are now "
                "considered inconsistent; some clusters may be leaked, run 'qemu-img check -r' "
                "on the image file to fix"
            )
            hdr.extensions.remove(ext)
            hdr.autoclear_features &= ~AUTOCLEAR_BITMAPS
            if not drv.node.read_only:
                await drv.rewrite_header()
            return
        self.ext = parse_extension(ext, drv.cluster_size)
        self.entries = await self._read_directory(self.ext)
        node = drv.node
        loaded: list[DirtyBitmap] = []
        try:
            for e in self.entries:
                if find_bitmap(node, e.name) is not None:
                    raise QmpError(f"Bitmap already exists: {e.name}")
                in_use = bool(e.flags & FLAG_IN_USE)
                bm = load_bitmap(
                    node,
                    e.name,
                    e.granularity,
                    None if in_use else await self._read_bits(e),
                    disabled=not e.flags & FLAG_AUTO,
                    inconsistent=in_use,
                    readonly=node.read_only,
                )
                loaded.append(bm)
            if not node.read_only:
                await self.mark_in_use()
        except BaseException:
            for bm in loaded:
                release(node, bm)
            raise

    async def _read_directory(self, ext: BitmapsExtension) -> list[DirEntry]:
        drv = self.drv
        try:
            buf = bytes(await drv.read_meta(ext.directory_offset, ext.directory_size))
        except OSError as exc:
            raise QmpError(f"Failed to read bitmap directory: {exc.strerror}") from None
        return parse_directory(buf, ext.nb_bitmaps, drv.cluster_size, drv.size)

    async def _read_table(self, e: DirEntry) -> list[int]:
        """The bitmap table, read (and checked) once per entry."""
        if e.table is not None:
            return e.table
        cs = self.drv.cluster_size
        raw = await self.drv.read_meta(e.table_offset, e.table_size * 8)
        table = list(struct.unpack(f">{e.table_size}Q", raw))
        if not all(check_table_entry(t, cs) for t in table):
            raise OSError(errno.EINVAL, "Invalid argument")
        e.table = table
        return table

    async def _read_bits(self, e: DirEntry) -> bitarray:
        drv = self.drv
        cs = drv.cluster_size
        nbits = bitmap_bits(drv.size, e.granularity)
        try:
            if table_size_for(drv.size, e.granularity, cs) != e.table_size:
                raise OSError(errno.EINVAL, "Invalid argument")
            try:
                table = await self._read_table(e)
            except OSError as exc:
                raise QmpError(
                    f"Could not read bitmap_table table from image for bitmap '{e.name}': "
                    f"{exc.strerror}"
                ) from None
            bits = bitarray(endian="little")
            for t in table:
                off = t & ENTRY_OFFSET_MASK
                if off:
                    bits.frombytes(bytes(await drv.read_meta(off, cs)))
                else:
                    bits.frombytes((b"\xff" if t & ENTRY_ALL_ONES else b"\0") * cs)
        except OSError as exc:
            raise QmpError(f"Could not read bitmap '{e.name}' from image: {exc.strerror}") from None
        del bits[nbits:]
        out = bitarray(bits, endian="big")
        return out

    # -- QMP hooks -----------------------------------------------------------------------------
    def can_store_new(self, name: str, granularity: int) -> None:
        drv = self.drv
        node = drv.node
        hdr = drv.hdr
        assert hdr is not None
        reason: str | None = None
        if hdr.version < 3:
            reason = "Cannot store dirty bitmaps in qcow2 v2 files"
        elif node.read_only:
            reason = "the image is opened read-only"
        else:
            reason = constraints_error(drv.size, drv.cluster_size, name, granularity)
        if reason is None:
            persistent = [bm for bm in bitmaps_of(node) if bm.persistent and bm.name]
            names = {bm.name for bm in persistent} | {e.name for e in self.entries}
            if len(names) + 1 > MAX_BITMAPS:
                reason = "Maximum number of persistent bitmaps is already reached"
            elif sum(entry_size(n) for n in names if n) + entry_size(name) > MAX_DIRECTORY_SIZE:
                reason = "Not enough space in the bitmap directory"
        if reason is not None:
            raise QmpError(f"Can't make bitmap '{name}' persistent in '{node.node_name}': {reason}")

    async def remove(self, name: str) -> None:
        """Drop *name* from the image now (QEMU's qcow2_co_remove_persistent_dirty_bitmap); a
        bitmap that was never stored is not an error."""
        old = next((e for e in self.entries if e.name == name), None)
        if old is None:
            return
        try:
            await self._commit_directory([e for e in self.entries if e is not old], [old])
        except OSError as exc:
            raise QmpError(f"Failed to update bitmap extension: {exc.strerror}") from None

    def info(self) -> list[dict[str, Any]]:
        """``format-specific`` ``bitmaps`` as qemu-img info shows them: the image's view."""
        out = []
        for e in self.entries:
            flags = []
            if e.flags & FLAG_IN_USE:
                flags.append("in-use")
            if e.flags & FLAG_AUTO:
                flags.append("auto")
            out.append({"flags": flags, "name": e.name, "granularity": e.granularity})
        return out

    def check_resize(self) -> None:
        """QEMU refuses to resize while an image bitmap cannot follow."""
        for e in self.entries:
            bm = find_bitmap(self.drv.node, e.name)
            if bm is None:
                raise QmpError(
                    "Cannot resize qcow2 with persistent bitmaps that were not loaded into memory"
                )
            bm.check(DEFAULT)

    # -- writing -------------------------------------------------------------------------------
    async def mark_in_use(self) -> None:
        """Flag every bitmap of the directory in use (the image copy is now stale)."""
        if not self.entries or all(e.flags & FLAG_IN_USE for e in self.entries):
            return
        new = [replace(e, flags=e.flags | FLAG_IN_USE) for e in self.entries]
        # In place, flags only, before any write is accepted: a torn update leaves each
        # bitmap flagged or unflagged-but-still-exact, and needs no allocation (on an image
        # with damaged refcounts an allocation could land on live data).
        data = pack_directory(new)
        ext = self.ext
        try:
            if ext is not None and len(data) == ext.directory_size:
                await self.drv.write_meta(ext.directory_offset, data)
                await self.drv.sync()
            else:
                await self._commit_directory(new, [])
        except OSError as exc:
            raise QmpError(f"Can't update bitmap directory: {exc.strerror}") from None
        self.entries = new

    def unstored_fate(self) -> str:
        """What becomes of the bitmaps a failed store leaves behind, for the log at close."""
        on_disk = {e.name for e in self.entries}
        names = [bm.name or "" for bm in self.to_store()]
        kept = ", ".join(f"'{n}'" for n in names if n in on_disk)
        lost = ", ".join(f"'{n}'" for n in names if n not in on_disk)
        parts = []
        if kept:
            parts.append(f"{kept} stay flagged in use in the image (reported inconsistent)")
        if lost:
            parts.append(f"{lost} were never in the image and are lost")
        return "; ".join(parts) or "nothing was lost"

    def to_store(self) -> list[DirtyBitmap]:
        return [
            bm
            for bm in bitmaps_of(self.drv.node)
            if bm.persistent
            and bm.name
            and not bm.inconsistent
            and not bm.readonly
            and not bm.skip_store
        ]

    async def store(self) -> None:
        """Write every persistent bitmap of the node to the image, ``in_use`` cleared (QEMU's
        qcow2_store_persistent_dirty_bitmaps). Raises QmpError; the image then still holds
        the previous directory (in use: inconsistent on the next open, never stale)."""
        drv = self.drv
        todo = self.to_store()
        if not todo:
            return
        if drv.node.read_only:
            raise QmpError("No write access")
        by_name = {e.name: e for e in self.entries}
        dropped: list[DirEntry] = []
        written: list[DirEntry] = []
        try:
            for bm in todo:
                assert bm.name is not None
                err = constraints_error(drv.size, drv.cluster_size, bm.name, bm.granularity)
                if err is not None:
                    raise QmpError(f"Bitmap '{bm.name}' doesn't satisfy the constraints: {err}")
                old = by_name.get(bm.name)
                if old is not None:
                    if not old.flags & FLAG_IN_USE:
                        raise QmpError(f"Bitmap '{bm.name}' already exists in the image")
                    dropped.append(old)
                elif len(self.entries) + len(written) - len(dropped) + 1 > MAX_BITMAPS:
                    raise QmpError("Too many persistent bitmaps")
                written.append(await self._write_bitmap(bm))
        except BaseException as exc:
            # Nothing refers to what was written yet: give it back.
            for e in written:
                await self._free_table(e)
            if isinstance(exc, OSError):
                raise QmpError(f"Failed to store bitmaps: {exc.strerror}") from None
            raise
        # Directory order: the image's entries keep their places, new ones go last.
        fresh = {e.name: e for e in written}
        new_entries = [fresh.pop(e.name, e) for e in self.entries]
        new_entries.extend(fresh.values())
        try:
            await self._commit_directory(new_entries, dropped)
        except OSError as exc:
            # Whether cluster 0 changed is unknown: leak the new clusters rather than risk
            # freeing what the image may point to.
            raise QmpError(f"Failed to update bitmap extension: {exc.strerror}") from None

    async def _write_bitmap(self, bm: DirtyBitmap) -> DirEntry:
        """Bits to fresh data clusters, then the table to fresh clusters; nothing refers to
        them yet, so a crash here leaks at worst."""
        drv = self.drv
        cs = drv.cluster_size
        bits = bm.hb.bits
        succ = bm.successor
        if succ is not None and len(succ.hb.bits) == len(bits):
            bits = bits | succ.hb.bits
        auto = not bm.disabled if succ is None else not succ.disabled
        le = bitarray(bits, endian="little")
        nsize = table_size_for(drv.size, bm.granularity, cs)
        # The last chunk may be short: _write_new pads it with zeroes.
        table = [0] * nsize
        per = cs * 8
        try:
            for i in range(nsize):
                chunk = le[i * per : (i + 1) * per]
                if chunk.any():
                    table[i] = await self._write_new(chunk.tobytes())
            toff = await self._write_new(struct.pack(f">{nsize}Q", *table))
        except BaseException:
            async with drv.lock:
                for off in table:
                    if off:
                        drv._queue_free(off, cs)
            raise
        return DirEntry(
            bm.name or "",
            toff,
            nsize,
            FLAG_AUTO if auto else 0,
            bm.granularity.bit_length() - 1,
            table,
        )

    async def _write_new(self, data: bytes) -> int:
        """*data* to freshly allocated clusters (zero-padded to whole clusters); returns
        their offset. Nothing refers to them yet: a failed write gives them back."""
        drv = self.drv
        cs = drv.cluster_size
        nclusters = -(-len(data) // cs)
        async with drv.lock:
            off = await drv._r.alloc(nclusters)
        try:
            await drv.write_meta(off, data + bytes(nclusters * cs - len(data)))
        except BaseException:
            async with drv.lock:
                drv._queue_free(off, len(data))
            raise
        return off

    async def _commit_directory(self, entries: list[DirEntry], drop: list[DirEntry]) -> None:
        """Make *entries* the image's directory: new directory clusters, flush, header, flush;
        then free the old directory and the tables of *drop*."""
        drv = self.drv
        hdr = drv.hdr
        assert hdr is not None
        new_ext: BitmapsExtension | None = None
        if entries:
            data = pack_directory(entries)
            if len(data) > MAX_DIRECTORY_SIZE:
                raise QmpError("Bitmap directory is too large")
            new_ext = BitmapsExtension(len(entries), len(data), await self._write_new(data))
        old_ext = self.ext
        # rewrite_header flushes refcounts and data before cluster 0 changes.
        _set_header_ext(hdr, new_ext)
        try:
            await drv.rewrite_header()
        except BaseException:
            # Put the old pointer back in memory; the new directory leaks (harmless).
            _set_header_ext(hdr, old_ext)
            raise
        self.ext = new_ext
        self.entries = entries
        drv.refresh_meta_clusters()
        try:
            async with drv.lock:
                if old_ext is not None:
                    drv._queue_free(old_ext.directory_offset, old_ext.directory_size)
            for e in drop:
                await self._free_table(e)
            async with drv.lock:
                await drv._sync_metadata(force_frees=True)
        except OSError as exc:
            # The new directory is in place; the old clusters merely leak.
            drv.log_warning(f"could not free old bitmap clusters: {exc.strerror}")

    async def _free_table(self, e: DirEntry) -> None:
        """Free a bitmap's data clusters and table (QEMU's free_bitmap_clusters); a table
        that cannot be read leaks its data clusters rather than freeing wrong ones."""
        drv = self.drv
        cs = drv.cluster_size
        if not e.table_offset:
            return
        try:
            table = await self._read_table(e)
        except OSError:
            table = []
        async with drv.lock:
            for t in table:
                off = t & ENTRY_OFFSET_MASK
                if off:
                    drv._queue_free(off, cs)
            drv._queue_free(e.table_offset, e.table_size * 8)


def _clusters(offset: int, nbytes: int, cluster_bits: int) -> range:
    if nbytes <= 0:
        return range(0)
    return range(offset >> cluster_bits, ((offset + nbytes - 1) >> cluster_bits) + 1)


def _set_header_ext(hdr: Qcow2Header, ext: BitmapsExtension | None) -> None:
    """Point the header's bitmaps extension (and autoclear bit) at *ext*, or drop it."""
    hdr.extensions = [x for x in hdr.extensions if x.type != EXT_BITMAPS]
    if ext is not None:
        hdr.extensions.append(HeaderExtension(EXT_BITMAPS, ext.pack()))
        hdr.autoclear_features |= AUTOCLEAR_BITMAPS
    else:
        hdr.autoclear_features &= ~AUTOCLEAR_BITMAPS
