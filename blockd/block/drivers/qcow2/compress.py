"""Decompression of compressed clusters (QEMU's block/qcow2-threads.c: qcow2_zlib_decompress,
qcow2_zstd_decompress) and the compressed-L2-entry arithmetic of docs/interop/qcow2.txt.

zlib streams are raw deflate (no zlib header). zstd needs the optional ``zstandard`` module,
which blockd does not depend on: an image whose header says zstd is refused at open when the
module is missing, rather than failing on the first compressed read.
"""

from __future__ import annotations

import errno
import zlib
from typing import Any

from blockd.block.drivers.qcow2.header import COMPRESSION_ZSTD
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
            out = dctx.decompressobj().decompress(bytes(data))
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
