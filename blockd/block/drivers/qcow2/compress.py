"""Compression and decompression of clusters (QEMU's block/qcow2-threads.c) and the
compressed-L2-entry arithmetic of docs/interop/qcow2.txt.

zlib streams are raw deflate (no zlib header). zstd comes from the ``zstandard`` module (a
dependency of blockd); should it be missing anyway, an image whose header says zstd is refused
at open rather than failing on the first compressed read.
"""

from __future__ import annotations

import errno
import zlib
from typing import Any

from blockd.block.drivers.qcow2.header import COMPRESSION_ZSTD, OFLAG_COMPRESSED
from blockd.errors import QmpError

try:  # pragma: no cover - depends on the environment
    import zstandard as _zstd

    _zstd_mod: Any = _zstd
except ImportError:  # pragma: no cover
    _zstd_mod = None


def check_supported(compression_type: int) -> None:
    if compression_type == COMPRESSION_ZSTD and _zstd_mod is None:
        raise QmpError(
            "qcow2: compression type 'zstd' needs the Python module 'zstandard', "
            "which is not installed"
        )


class CompressedLayout:
    """Where a compressed cluster's bytes are, from its L2 entry."""

    def __init__(self, cluster_bits: int) -> None:
        self.csize_shift = 62 - (cluster_bits - 8)
        self.csize_mask = (1 << (cluster_bits - 8)) - 1
        self.offset_mask = (1 << self.csize_shift) - 1

    def parse(self, entry: int) -> tuple[int, int, int]:
        """(host offset of the data, bytes to read, sector-aligned start of the
        refcounted range); the range is ``nb_sectors * 512`` bytes from that start."""
        coffset = entry & self.offset_mask
        nb_sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        csize = nb_sectors * 512 - (coffset & 511)
        return coffset, csize, nb_sectors * 512

    def entry(self, host: int, nbytes: int) -> int:
        """The L2 entry of *nbytes* compressed bytes stored at byte offset *host*: the
        compressed flag, the offset, and the sectors after the first that the data reaches
        (never the COPIED flag: the host cluster may be shared)."""
        if host > self.offset_mask:
            raise OSError(errno.EFBIG, "qcow2: compressed cluster offset out of range")
        extra = (host + nbytes - 1) // 512 - host // 512
        if extra > self.csize_mask:
            raise OSError(errno.EIO, "qcow2: compressed cluster too large")
        return OFLAG_COMPRESSED | (extra << self.csize_shift) | host

    def host_range(self, entry: int) -> tuple[int, int]:
        """Bytes the refcounts of a compressed cluster cover: (start, length)."""
        coffset = entry & self.offset_mask
        nb_sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return coffset & ~511, nb_sectors * 512


def decompress(compression_type: int, data: bytes | bytearray | memoryview, out_len: int) -> bytes:
    """Exactly *out_len* bytes from *data*, or OSError(EIO) as QEMU fails such a read."""
    if compression_type == COMPRESSION_ZSTD:
        if _zstd_mod is None:  # pragma: no cover - refused at open
            raise OSError(errno.ENOTSUP, "zstd not available")
        try:
            dctx = _zstd_mod.ZstdDecompressor()
            out: bytes = dctx.decompressobj().decompress(bytes(data))
        except Exception as exc:
            raise OSError(errno.EIO, f"qcow2: bad zstd cluster: {exc}") from None
        out = out[:out_len]
    else:
        try:
            d = zlib.decompressobj(-15)
            out = d.decompress(bytes(data), out_len)
        except zlib.error as exc:
            raise OSError(errno.EIO, f"qcow2: bad compressed cluster: {exc}") from None
    if len(out) != out_len:
        raise OSError(errno.EIO, "qcow2: compressed cluster too short")
    return out


def compress(compression_type: int, data: bytes | bytearray | memoryview) -> bytes | None:
    """One whole cluster compressed, or None when the result would not be smaller than the
    cluster (then the cluster is written uncompressed, as QEMU does when its output buffer
    of ``cluster_size - 1`` bytes is too small).

    zlib: raw deflate, default level, 4 KiB window (wbits -12), memLevel 9, as QEMU writes
    it. zstd: one frame at the default level.
    """
    limit = len(data) - 1
    out: bytes
    if compression_type == COMPRESSION_ZSTD:
        if _zstd_mod is None:  # pragma: no cover - refused at open
            raise OSError(errno.ENOTSUP, "zstd not available")
        out = _zstd_mod.ZstdCompressor().compress(bytes(data))
    else:
        c = zlib.compressobj(
            zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9, zlib.Z_DEFAULT_STRATEGY
        )
        out = c.compress(data) + c.flush()
    if len(out) > limit:
        return None
    return out


def compress_clusters(
    compression_type: int, data: bytes | bytearray | memoryview, cluster_size: int
) -> list[bytes | None]:
    """:func:`compress` for each cluster of *data* (a short last cluster is padded with
    zeroes); one thread-pool hop for a whole request."""
    mv = memoryview(data).cast("B")
    out: list[bytes | None] = []
    for pos in range(0, len(mv), cluster_size):
        part = mv[pos : pos + cluster_size]
        if len(part) < cluster_size:
            part = memoryview(bytes(part) + bytes(cluster_size - len(part)))
        out.append(compress(compression_type, part))
    return out
