"""``blockdev-create`` for qcow2 (QEMU's qcow2_co_create in block/qcow2.c).

The steps follow QEMU's so the result is the same bytes as ``qemu-img create``: a bare header
with the refcount table in cluster 1 and its first block in cluster 2, then the image is opened
with the normal driver, which grows the L1 table to the requested size (allocating it in
cluster 3, written with its exact length), preallocates if asked, and finally cluster 0 is
rewritten whole with the feature name table and the backing file name.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from blockd.block.drivers.qcow2.header import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    INCOMPAT_COMPRESSION,
    V3_HEADER_LEN_WRITTEN,
    Qcow2Header,
    feature_table_ext,
)
from blockd.errors import QmpError

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph
    from blockd.block.node import BlockNode


def _enum_value(v: Any) -> Any:
    return getattr(v, "value", v)


def _validate(options: Any) -> tuple[int, int, int, int, str]:
    """QEMU's checks, in QEMU's order: (version, cluster_bits, refcount_order,
    compression type, preallocation)."""
    size = options.size
    if size % 512:
        raise QmpError("Image size must be a multiple of 512 bytes")
    version = 2 if _enum_value(options.version) == "v2" else 3
    cluster_size = 65536 if options.cluster_size is None else options.cluster_size
    if cluster_size < 512 or cluster_size > 2 * 1024 * 1024 or cluster_size & (cluster_size - 1):
        raise QmpError("Cluster size must be a power of two between 512 and 2048k")
    extended_l2 = bool(options.extended_l2)
    prealloc = str(_enum_value(options.preallocation) or "off")
    if options.backing_file and prealloc != "off" and not extended_l2:
        raise QmpError(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on"
        )
    if options.backing_fmt is not None and not options.backing_file:
        raise QmpError("Backing format cannot be used without backing file")
    if version < 3 and options.lazy_refcounts:
        raise QmpError(
            "Lazy refcounts only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)"
        )
    refcount_bits = 16 if options.refcount_bits is None else options.refcount_bits
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise QmpError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise QmpError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above "
            "(use version=v3 or greater)"
        )
    if options.data_file is not None or options.data_file_raw:
        if options.data_file is None:
            raise QmpError("'data-file-raw' requires 'data-file'")
        raise QmpError("blockd does not support qcow2 external data files ('data-file')")
    ctype = (
        COMPRESSION_ZSTD if _enum_value(options.compression_type) == "zstd" else (COMPRESSION_ZLIB)
    )
    if version < 3 and ctype != COMPRESSION_ZLIB:
        raise QmpError(
            "Non-zlib compression type is only supported with compatibility level 1.1 and "
            "above (use version=v3 or greater)"
        )
    if extended_l2:
        if cluster_size < 16384:
            raise QmpError(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
            )
        raise QmpError("blockd does not support qcow2 extended L2 entries (subclusters)")
    if ctype == COMPRESSION_ZSTD:
        from blockd.block.drivers.qcow2.compress import check_supported

        check_supported(ctype)
    return version, cluster_size.bit_length() - 1, refcount_bits.bit_length() - 1, ctype, prealloc


async def create_image(options: Any, graph: BlockGraph) -> None:
    version, cluster_bits, refcount_order, ctype, prealloc = _validate(options)
    cs = 1 << cluster_bits
    temp_file = False
    if isinstance(options.file, str):
        file_node = graph.find(options.file)
        if file_node is None:
            raise QmpError(f"Cannot find device='{options.file}' nor node-name='{options.file}'")
    else:
        file_node = await graph.open_node(options.file)
        temp_file = True
    try:
        await _write_skeleton(
            file_node, version, cluster_bits, refcount_order, ctype, bool(options.lazy_refcounts)
        )
        hdr = await _grow_and_finish(file_node, graph, options.size, prealloc)
        hdr.version = version
        hdr.compression_type = ctype
        if version >= 3:
            hdr.header_length = V3_HEADER_LEN_WRITTEN
            hdr.refcount_order = refcount_order
            if options.lazy_refcounts:
                hdr.compatible_features |= COMPAT_LAZY_REFCOUNTS
            if ctype != COMPRESSION_ZLIB:
                hdr.incompatible_features |= INCOMPAT_COMPRESSION
            # QEMU leaves the feature name table out of images with clusters below 8 KiB.
            hdr.extensions = [feature_table_ext()] if cs >= 8192 else []
        if options.backing_file:
            hdr.backing_file = options.backing_file
            if options.backing_fmt is not None:
                hdr.backing_format = str(_enum_value(options.backing_fmt))
        cluster0 = hdr.pack_cluster0()
        await file_node.write(0, cluster0 + bytes(cs - len(cluster0)))
        await file_node.flush()
    finally:
        if temp_file:
            await graph.maybe_free(file_node)


async def _write_skeleton(
    file_node: BlockNode,
    version: int,
    cluster_bits: int,
    refcount_order: int,
    ctype: int,
    lazy: bool,
) -> None:
    """Header, refcount table and one refcount block counting those three clusters."""
    cs = 1 << cluster_bits
    hdr = Qcow2Header(
        version=3,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=0,
        crypt_method=0,
        l1_size=0,
        l1_table_offset=0,
        refcount_table_offset=cs,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=refcount_order,
        header_length=V3_HEADER_LEN_WRITTEN,
        compression_type=ctype,
        incompatible_features=INCOMPAT_COMPRESSION if ctype != COMPRESSION_ZLIB else 0,
        compatible_features=COMPAT_LAZY_REFCOUNTS if lazy else 0,
    )
    buf = bytearray(3 * cs)
    head = hdr.pack_fixed()
    buf[: len(head)] = head
    struct.pack_into(">Q", buf, cs, 2 * cs)
    from blockd.block.drivers.qcow2.refcount import _accessors

    _get, put = _accessors(refcount_order)
    block = memoryview(buf)[2 * cs :]
    rb = bytearray(block)
    for i in range(3):
        put(rb, i, 1)
    buf[2 * cs :] = rb
    if file_node.length:
        try:
            await file_node.truncate(0)
        except QmpError:
            # A protocol that cannot shrink (ssh) keeps its old bytes past the image, as
            # under QEMU, whose qcow2 create writes over the file without truncating it.
            pass
    if file_node.length < 3 * cs:
        await file_node.truncate(3 * cs)
    await file_node.write(0, buf)


async def _grow_and_finish(
    file_node: BlockNode, graph: BlockGraph, size: int, prealloc: str
) -> Qcow2Header:
    """Open the skeleton with the driver, give it its size, return the header to write."""
    from blockd.block.drivers.qcow2.driver import Qcow2Driver
    from blockd.qapi.base import ArgsValidator
    from blockd.qapi.block import BlockdevOptions

    opts = ArgsValidator(BlockdevOptions).validate(
        {"driver": "qcow2", "file": file_node.node_name, "backing": None}
    )
    node = await graph.open_node(opts, inherit_read_only=False)
    try:
        drv = node.driver
        assert isinstance(drv, Qcow2Driver)
        try:
            await drv._grow(size, exact=True)
        except QmpError as exc:
            raise QmpError(f"Could not resize image: {exc.desc}") from None
        if prealloc != "off":
            await drv.preallocate_metadata(0, size, file_prealloc=prealloc)
        async with drv.lock:
            await drv._sync_metadata(force_frees=True)
        m, r = drv._m, drv._r
        assert drv.hdr is not None
        hdr = drv.hdr
        hdr.size = size
        hdr.l1_size = m.l1_size
        hdr.l1_table_offset = m.l1_offset if m.l1_size else 0
        hdr.refcount_table_offset = r.table_offset
        hdr.refcount_table_clusters = r.table_clusters
        hdr.extensions = []
        return hdr
    finally:
        await graph.maybe_free(node)
