"""Chunk hashes per layer and the digest of a disk at a point.

As Proxmox Backup Server does for block images, a disk is a row of fixed-size chunks (here the
layer's cluster size, 64 KiB, which is also the bitmap's granularity, so a dirty cluster is
exactly one chunk) and the disk's digest at a point is the SHA-256 of the row of its chunk
hashes (XXH3-128 each, see layers.py). Each layer keeps the hashes of the chunks it holds in
a ``.sums`` file beside it; the row for point N is the base layer's hashes overlaid with each
incremental's up to N, unlisted chunks being zeroes. An incremental run therefore hashes only
what it copied, reading its new layer once, and ``verify`` needs neither the live disk nor any
layer but those of the chain.

A ``.sums`` file: magic, chunk size, flags (bit 0: base layer), disk size, count, the sorted
chunk indexes (u64 little-endian), their hashes (16 bytes each), and the SHA-256 of all that
(so a damaged sums file is told apart from a damaged layer).
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

from blockd.tools.backup.errors import ToolError
from blockd.tools.backup.layers import HASH_SIZE, LayerMap, zero_hash
from blockd.tools.backup.manifest import write_atomic

MAGIC = b"BBSUMS\x00\x02"
_HEAD = struct.Struct("<8sIIQQ")
FLAG_BASE = 1
DIGEST_PREFIX = "sha256:"


@dataclass
class Sums:
    chunk_size: int
    size: int
    base: bool
    indices: array[int]
    hashes: bytes

    @classmethod
    def from_chunks(cls, lm: LayerMap, chunks: dict[int, bytes]) -> Sums:
        order = sorted(chunks)
        return cls(
            lm.cluster_size,
            lm.size,
            lm.backing is None,
            array("Q", order),
            b"".join(chunks[i] for i in order),
        )

    def __len__(self) -> int:
        return len(self.indices)

    def as_dict(self) -> dict[int, bytes]:
        h = self.hashes
        return {idx: h[k * HASH_SIZE : (k + 1) * HASH_SIZE] for k, idx in enumerate(self.indices)}

    def pack(self) -> bytes:
        idx = array("Q", self.indices)
        if idx.itemsize != 8:  # pragma: no cover - every platform blockd runs on
            raise ToolError("unsupported platform: array('Q') is not 64-bit")
        body = (
            _HEAD.pack(MAGIC, self.chunk_size, FLAG_BASE if self.base else 0, self.size, len(idx))
            + _le(idx).tobytes()
            + self.hashes
        )
        return body + hashlib.sha256(body).digest()

    @classmethod
    def unpack(cls, data: bytes, where: Path) -> Sums:
        if len(data) < _HEAD.size + 32 or data[:8] != MAGIC:
            raise ToolError(f"{where} is not a blockd-backup sums file")
        body, check = data[:-32], data[-32:]
        if hashlib.sha256(body).digest() != check:
            raise ToolError(f"{where} is damaged (its own checksum does not match)")
        _magic, cs, flags, size, count = _HEAD.unpack_from(body)
        want = _HEAD.size + count * (8 + HASH_SIZE)
        if len(body) != want:
            raise ToolError(f"{where} is damaged (length)")
        idx = array("Q")
        idx.frombytes(body[_HEAD.size : _HEAD.size + count * 8])
        idx = _le(idx)
        return cls(cs, size, bool(flags & FLAG_BASE), idx, body[_HEAD.size + count * 8 :])


def _le(a: array[int]) -> array[int]:
    """*a* with little-endian items (a copy swapped on big-endian hosts)."""
    if sys.byteorder == "little":
        return a
    b = array("Q", a)
    b.byteswap()
    return b


def write_sums(path: Path, sums: Sums) -> None:
    write_atomic(path, sums.pack())


def read_sums(path: Path) -> Sums:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ToolError(f"cannot read {path}: {exc.strerror}") from None
    return Sums.unpack(data, path)


def point_digest(layers: list[Sums]) -> str:
    """The digest of the disk whose chain, base first, is *layers*."""
    top = layers[-1]
    cs, size = top.chunk_size, top.size
    n = -(-size // cs)
    row = bytearray(zero_hash(cs) * n)
    if size % cs:
        row[-HASH_SIZE:] = zero_hash(size % cs)
    for layer in layers:
        if layer.chunk_size != cs or layer.size != size:
            raise ToolError("layers of one chain differ in size or chunk size")
        h = layer.hashes
        # copy runs of consecutive chunks with one slice each (a full layer is a few runs)
        for k0, k1, idx0 in _runs_of(layer.indices):
            row[idx0 * HASH_SIZE : (idx0 + k1 - k0) * HASH_SIZE] = h[
                k0 * HASH_SIZE : k1 * HASH_SIZE
            ]
    head = struct.pack("<16sQQ", b"blockd-backup-v1", cs, size)
    return DIGEST_PREFIX + hashlib.sha256(head + row).hexdigest()


def _runs_of(indices: array[int]) -> list[tuple[int, int, int]]:
    """(first position, end position, first chunk index) of each run of consecutive indexes."""
    out = []
    start = 0
    for k in range(1, len(indices) + 1):
        if k == len(indices) or indices[k] != indices[k - 1] + 1:
            out.append((start, k, indices[start]))
            start = k
    return out


def merge(layers: list[Sums]) -> Sums:
    """The sums of one base layer holding what *layers* (base first) hold together."""
    merged: dict[int, bytes] = {}
    for layer in layers:
        merged.update(layer.as_dict())
    top = layers[-1]
    cs, size = top.chunk_size, top.size
    merged = {i: h for i, h in merged.items() if h != zero_hash(min(cs, size - i * cs))}
    order = sorted(merged)
    return Sums(cs, size, True, array("Q", order), b"".join(merged[i] for i in order))


def differences(expected: Sums, actual: Sums) -> list[int]:
    """Chunk indexes whose hash differs or that only one side lists."""
    a, b = expected.as_dict(), actual.as_dict()
    return sorted(i for i in a.keys() | b.keys() if a.get(i) != b.get(i))
