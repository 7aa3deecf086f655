"""The qcow2 header, its extensions and the limits checked at open (QEMU's block/qcow2.h and
the header parts of block/qcow2.c: qcow2_do_open, qcow2_read_extensions, qcow2_update_header).

The format is docs/interop/qcow2.txt. Everything here is pure parsing and packing of bytes, so
the open-time checks can run on a hostile image without touching the block graph: each check
fails with the text QEMU prints, and nothing is allocated from a size field before that size
has been bounded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from blockd.errors import QmpError

MAGIC = 0x514649FB
V2_HEADER_LEN = 72
V3_HEADER_LEN = 104
#: What QEMU writes for v3 (104 bytes + compression type byte + padding to 8).
V3_HEADER_LEN_WRITTEN = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

#: QEMU's QCOW_MAX_L1_SIZE and QCOW_MAX_REFTABLE_SIZE (bytes) and QCOW_MAX_SNAPSHOTS.
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
#: Host offsets must fit in the 56 bits an L2 entry holds.
MAX_HOST_OFFSET = 1 << 56

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# Byte offsets of the fields blockd rewrites in place (never the whole header while open,
# so extensions it does not understand survive untouched).
OFF_SIZE = 24
OFF_L1 = 36  # l1_size (u32) then l1_table_offset (u64): one 12-byte write
OFF_REFTABLE = 48  # refcount_table_offset (u64) then refcount_table_clusters (u32)
OFF_INCOMPAT = 72
OFF_AUTOCLEAR = 88

#: The feature name table QEMU writes into every v3 image it creates, in its order.
FEATURE_NAMES: list[tuple[int, int, str]] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
]

_V2 = struct.Struct(">IIQIIQIIQQIIQ")
_V3 = struct.Struct(">QQQII")


@dataclass
class HeaderExtension:
    """One header extension as found in the image, kept byte-exact so a rewrite of the
    header can put back what blockd does not interpret (e.g. the bitmaps directory pointer)."""

    type: int
    data: bytes


@dataclass
class BitmapsExtension:
    """The bitmaps extension fields (for the bitmap directory code that builds on this)."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int

    def pack(self) -> bytes:
        return struct.pack(">IIQQ", self.nb_bitmaps, 0, self.directory_size, self.directory_offset)


@dataclass
class Qcow2Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LEN
    compression_type: int = COMPRESSION_ZLIB
    extensions: list[HeaderExtension] = field(default_factory=list)
    backing_file: str | None = None
    backing_format: str | None = None
    #: bit -> name, from the image's feature name table (for error messages).
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def extension(self, ext_type: int) -> HeaderExtension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    # -- packing ---------------------------------------------------------------------------
    def pack_fixed(self) -> bytes:
        """The fixed header fields (72 bytes for v2, header_length bytes for v3)."""
        head = _V2.pack(
            MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version < 3:
            return head
        tail = _V3.pack(
            self.incompatible_features,
            self.compatible_features,
            self.autoclear_features,
            self.refcount_order,
            self.header_length,
        )
        out = bytearray(head + tail)
        if self.header_length > V3_HEADER_LEN:
            out.append(self.compression_type)
        out.extend(bytes(self.header_length - len(out)))
        return bytes(out)

    def pack_cluster0(self) -> bytes:
        """Header, extensions (backing format first, as QEMU orders them), end marker and the
        backing file name: the whole metadata part of cluster 0.

        Updates ``backing_file_offset``/``size`` to where the name lands. Raises QmpError
        when it does not fit in the cluster (QEMU's "-ENOSPC" case).
        """
        exts: list[HeaderExtension] = []
        if self.backing_format:
            exts.append(HeaderExtension(EXT_BACKING_FORMAT, self.backing_format.encode()))
        exts.extend(e for e in self.extensions if e.type != EXT_BACKING_FORMAT)
        body = bytearray()
        for ext in exts:
            body += struct.pack(">II", ext.type, len(ext.data)) + ext.data
            body += bytes(-len(ext.data) % 8)
        body += bytes(8)  # end of extensions
        hdr_len = V2_HEADER_LEN if self.version < 3 else self.header_length
        name = self.backing_file.encode("utf-8", "surrogateescape") if self.backing_file else b""
        if name:
            self.backing_file_offset = hdr_len + len(body)
            self.backing_file_size = len(name)
        else:
            self.backing_file_offset = 0
            self.backing_file_size = 0
        out = self.pack_fixed() + bytes(body) + name
        if len(out) > self.cluster_size:
            raise QmpError("Header extensions and backing file name do not fit in cluster 0")
        return out


def feature_table_ext() -> HeaderExtension:
    data = b"".join(
        struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in FEATURE_NAMES
    )
    return HeaderExtension(EXT_FEATURE_TABLE, data)


def parse_header(buf: bytes) -> Qcow2Header:
    """Parse and validate cluster 0.

    *buf* holds the first ``min(cluster_size, file_length)`` bytes (the caller learns the
    cluster size from :func:`peek_cluster_bits` first), so every extension and the backing
    name can be read without another I/O; a shorter file is judged as zero-padded.
    """
    if len(buf) < V2_HEADER_LEN:
        raise QmpError("Image is not in qcow2 format")
    fields = _V2.unpack_from(buf, 0)
    (
        magic,
        version,
        bf_off,
        bf_size,
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        nb_snap,
        snap_off,
    ) = fields
    if magic != MAGIC:
        raise QmpError("Image is not in qcow2 format")
    if version < 2 or version > 3:
        raise QmpError(f"Unsupported qcow2 version {version}")
    if cluster_bits < MIN_CLUSTER_BITS or cluster_bits > MAX_CLUSTER_BITS:
        raise QmpError(f"Unsupported cluster size: 2^{cluster_bits}")
    hdr = Qcow2Header(
        version,
        bf_off,
        bf_size,
        cluster_bits,
        size,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        nb_snap,
        snap_off,
    )
    cs = hdr.cluster_size
    if len(buf) < cs:
        # A file shorter than cluster 0 reads as zeroes past its end (as QEMU's file driver
        # pads short reads), so a truncated image is judged on the same bytes QEMU sees.
        buf = bytes(buf) + bytes(cs - len(buf))
    if version >= 3:
        (
            hdr.incompatible_features,
            hdr.compatible_features,
            hdr.autoclear_features,
            hdr.refcount_order,
            hdr.header_length,
        ) = _V3.unpack_from(buf, V2_HEADER_LEN)
        if hdr.header_length < V3_HEADER_LEN:
            raise QmpError("qcow2 header too short")
        if hdr.header_length > cs:
            raise QmpError("qcow2 header exceeds cluster size")
        if hdr.header_length > V3_HEADER_LEN:
            hdr.compression_type = buf[V3_HEADER_LEN]
    else:
        hdr.header_length = V2_HEADER_LEN
    if hdr.backing_file_offset > cs:
        raise QmpError("Invalid backing file offset")

    ext_end = hdr.backing_file_offset if hdr.backing_file_offset else cs
    _read_extensions(hdr, buf, hdr.header_length, ext_end)

    if hdr.refcount_order > 6:
        raise QmpError("Reference count entry width too large; may not exceed 64 bits")
    unknown = hdr.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        raise QmpError(f"Unsupported qcow2 feature(s): {_feature_text(hdr, unknown)}")
    if hdr.compression_type not in COMPRESSION_NAMES:
        raise QmpError(f"qcow2: unknown compression type: {hdr.compression_type}")
    if hdr.incompatible_features & INCOMPAT_COMPRESSION:
        if hdr.compression_type == COMPRESSION_ZLIB:
            raise QmpError("qcow2: Compression type incompatible feature bit must not be set")
    elif hdr.compression_type != COMPRESSION_ZLIB:
        raise QmpError("qcow2: Compression type incompatible feature bit must be set")
    if hdr.crypt_method > 2:
        raise QmpError(f"Unsupported encryption method {hdr.crypt_method}")
    if hdr.extension(EXT_CRYPTO) is not None and hdr.crypt_method != 2:
        raise QmpError("CRYPTO header extension only expected with LUKS encryption method")
    if (
        hdr.autoclear_features & AUTOCLEAR_DATA_FILE_RAW
        and not hdr.incompatible_features & INCOMPAT_DATA_FILE
    ):
        raise QmpError("data-file-raw requires a data file")

    # Refcount table (qcow2_validate_table: bound the size before trusting the offset).
    if hdr.refcount_table_clusters > MAX_REFTABLE_BYTES // cs:
        raise QmpError("Reference count table too large")
    if hdr.refcount_table_clusters == 0:
        raise QmpError("Image does not contain a reference count table")
    _validate_table(
        hdr, hdr.refcount_table_offset, hdr.refcount_table_clusters * cs, "Reference count table"
    )
    # Snapshot table: its offset is checked even when there are no snapshots.
    if hdr.nb_snapshots > MAX_SNAPSHOTS:
        raise QmpError("Snapshot table too large")
    _validate_table(
        hdr,
        hdr.snapshots_offset,
        hdr.nb_snapshots * 40,
        "Snapshot table",
        allow_zero=not hdr.nb_snapshots,
    )
    # L1 table.
    if hdr.l1_size > MAX_L1_BYTES // 8:
        raise QmpError("Active L1 table too large")
    l2_bits = cluster_bits - 3
    if hdr.size >= 1 << 63:
        raise QmpError("Image is too big")
    need = -(-hdr.size // (1 << (cluster_bits + l2_bits)))
    if need > 0x7FFFFFFF:
        raise QmpError("Image is too big")
    if hdr.l1_size < need:
        raise QmpError("L1 table is too small")
    _validate_table(
        hdr, hdr.l1_table_offset, hdr.l1_size * 8, "Active L1 table", allow_zero=not hdr.l1_size
    )

    if hdr.backing_file_offset:
        if hdr.backing_file_size > MAX_BACKING_NAME or (
            hdr.backing_file_size > cs - hdr.backing_file_offset
        ):
            raise QmpError("Backing file name too long")
        raw = bytes(buf[hdr.backing_file_offset : hdr.backing_file_offset + hdr.backing_file_size])
        raw = raw.split(b"\0", 1)[0]  # a C string, as QEMU reads it
        if raw:
            hdr.backing_file = raw.decode("utf-8", "surrogateescape")
    return hdr


def peek_cluster_bits(buf: bytes) -> int:
    """The cluster_bits field, validated, from the first bytes of an image."""
    if len(buf) < V2_HEADER_LEN or struct.unpack_from(">I", buf, 0)[0] != MAGIC:
        raise QmpError("Image is not in qcow2 format")
    bits = int(struct.unpack_from(">I", buf, 20)[0])
    version = int(struct.unpack_from(">I", buf, 4)[0])
    if version < 2 or version > 3:
        raise QmpError(f"Unsupported qcow2 version {version}")
    if bits < MIN_CLUSTER_BITS or bits > MAX_CLUSTER_BITS:
        raise QmpError(f"Unsupported cluster size: 2^{bits}")
    return bits


def _validate_table(
    hdr: Qcow2Header, offset: int, nbytes: int, what: str, allow_zero: bool = False
) -> None:
    """An offset that is cluster aligned, leaves the table below 2^63 and (unless the table
    is empty) is not the header."""
    if offset % hdr.cluster_size or offset + nbytes >= 1 << 63 or (offset == 0 and not allow_zero):
        raise QmpError(f"{what} offset invalid")


def _feature_text(hdr: Qcow2Header, mask: int) -> str:
    names = []
    rest = mask
    for bit in range(64):
        if mask & (1 << bit) and (0, bit) in hdr.feature_names:
            names.append(hdr.feature_names[(0, bit)])
            rest &= ~(1 << bit)
    if rest:
        names.append(f"Unknown incompatible feature: {rest:x}")
    return ", ".join(names)


def _read_extensions(hdr: Qcow2Header, buf: bytes, start: int, end: int) -> None:
    """Walk the extension list up to *end* (the backing file name, else the end of cluster 0;
    *buf* holds the whole cluster). Any header, the end marker's included, whose length runs
    past *end* is refused: a hostile image must not make us read or loop beyond cluster 0."""
    pos = start
    while pos < end:
        if pos + 8 > end:
            raise QmpError("Header extension too large")
        ext_type, ext_len = struct.unpack_from(">II", buf, pos)
        pos += 8
        if ext_len > end - pos:
            raise QmpError("Header extension too large")
        if ext_type == EXT_END:
            return
        if ext_type == EXT_BITMAPS and ext_len != 24:
            # Checked whatever the autoclear bit says (the rest is the bitmap code's).
            raise QmpError("bitmaps_ext: Invalid extension length")
        data = bytes(buf[pos : pos + ext_len])
        pos += (ext_len + 7) & ~7
        if ext_type == EXT_BACKING_FORMAT:
            if ext_len >= 16:
                raise QmpError(f"ERROR: ext_backing_format: len={ext_len} too large (>=16)")
            hdr.backing_format = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif ext_type == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                kind, bit = data[i], data[i + 1]
                name = data[i + 2 : i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                hdr.feature_names[(kind, bit)] = name
        hdr.extensions.append(HeaderExtension(ext_type, data))
