"""``blockdev-create`` for vmdk (QEMU's vmdk_co_create, vmdk_co_do_create and
vmdk_init_extent): the same descriptor and sparse headers ``qemu-img create -f vmdk`` makes,
byte for byte apart from the random CID.

The descriptor goes into ``file``; split and flat subformats put the data into the nodes
listed in ``extents`` (2 GiB each for the twoGbMaxExtent subformats), the monolithic sparse
ones into ``file`` itself, with the descriptor embedded at sector 1.
"""

from __future__ import annotations

import os
import random
import struct
from typing import TYPE_CHECKING, Any

from blockd.block.drivers.vmdk import descriptor as desc
from blockd.block.drivers.vmdk.extent import SECTOR
from blockd.block.drivers.vmdk.sparse import (
    COMPRESSION_DEFLATE,
    FLAG_COMPRESS,
    FLAG_MARKER,
    FLAG_NL_DETECT,
    FLAG_RGD,
    FLAG_ZERO_GRAIN,
    VMDK4_MAGIC,
    Vmdk4Header,
)
from blockd.block.probe import probe_format, sibling
from blockd.errors import QmpError

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph
    from blockd.block.node import BlockNode

SPLIT_SIZE = 0x80000000
GRANULARITY = 128
GTES_PER_GT = 512
#: QEMU builds the parentFileNameHint line in a buffer of this size.
BUF_SIZE = 4096


def _value(v: Any, default: str) -> str:
    return str(getattr(v, "value", v)) if v is not None else default


def sparse_layout(size: int, compress: bool, zeroed_grain: bool) -> bytes:
    """Header, both grain directories and the room for the grain tables of a new hosted
    sparse extent of *size* bytes (the bytes up to the first grain; the rest of the file
    is zeroes)."""
    capacity = size // SECTOR
    grains = -(-capacity // GRANULARITY)
    gt_size = -(-(GTES_PER_GT * 4) // SECTOR)
    gt_count = -(-grains // GTES_PER_GT)
    gd_sectors = -(-(gt_count * 4) // SECTOR)
    rgd = 21
    gd = rgd + gd_sectors + gt_size * gt_count
    grain_offset = -(-(gd + gd_sectors + gt_size * gt_count) // GRANULARITY) * GRANULARITY
    flags = FLAG_RGD | FLAG_NL_DETECT
    if compress:
        flags |= FLAG_COMPRESS | FLAG_MARKER
    if zeroed_grain:
        flags |= FLAG_ZERO_GRAIN
    hdr = Vmdk4Header(
        version=3 if compress else 2 if zeroed_grain else 1,
        flags=flags,
        capacity=capacity,
        granularity=GRANULARITY,
        desc_offset=1,
        desc_size=20,
        num_gtes_per_gt=GTES_PER_GT,
        rgd_offset=rgd,
        gd_offset=gd,
        grain_offset=grain_offset,
        check_bytes=b"\n \r\n",
        compress_algorithm=COMPRESSION_DEFLATE if compress else 0,
    )
    out = bytearray(grain_offset * SECTOR)
    out[:4] = VMDK4_MAGIC
    packed = hdr.pack()
    out[4 : 4 + len(packed)] = packed
    for table_at in (rgd, gd):
        first = table_at + gd_sectors
        entries = [first + i * gt_size for i in range(gt_count)]
        struct.pack_into(f"<{gt_count}I", out, table_at * SECTOR, *entries)
    return bytes(out)


async def _init_extent(
    node: BlockNode, size: int, flat: bool, compress: bool, zeroed_grain: bool
) -> None:
    """QEMU's vmdk_init_extent: a flat extent is *size* bytes of file, a sparse one gets its
    header and tables (written over what the file had, the length set to the first grain)."""
    if flat:
        await node.truncate(size)
        return
    layout = sparse_layout(size, compress, zeroed_grain)
    await node.truncate(len(layout))
    await node.write(0, layout)


class _Opened:
    """Nodes opened for the create from inline options, closed again at the end."""

    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph
        self.temp: list[BlockNode] = []

    async def open(self, ref: Any) -> BlockNode:
        if isinstance(ref, str):
            node = self.graph.find(ref)
            if node is None:
                raise QmpError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            return node
        node = await self.graph.open_node(ref)
        self.temp.append(node)
        return node

    async def close(self) -> None:
        for node in self.temp:
            await self.graph.maybe_free(node)


async def _parent_cid(graph: BlockGraph, file_node: BlockNode, backing_file: str) -> int:
    """The CID of the image a new delta will point to (opened without its own parents)."""
    from blockd.block.drivers.vmdk.driver import VmdkDriver
    from blockd.qapi.base import ArgsValidator
    from blockd.qapi.block import BlockdevOptions

    _full, file_opts = sibling(file_node, backing_file)
    validate = ArgsValidator(BlockdevOptions).validate
    probe = await graph.open_node(validate({**file_opts, "read-only": True}))
    await graph.maybe_free(probe)
    fmt = await probe_format(graph, file_opts)
    if fmt != "vmdk":
        raise QmpError(f"Invalid backing file format: {fmt}. Must be vmdk")
    spec = {"driver": "vmdk", "file": file_opts, "backing": None, "read-only": True}
    node = await graph.open_node(validate(spec))
    try:
        assert isinstance(node.driver, VmdkDriver)
        cid = await node.driver.current_cid()
    finally:
        await graph.maybe_free(node)
    if cid is None:
        raise QmpError("Failed to read parent CID")
    return cid


async def create_image(options: Any, graph: BlockGraph) -> None:
    size = options.size
    if size % SECTOR:
        raise QmpError("Image size must be a multiple of 512 bytes")
    subformat = _value(options.subformat, "monolithicSparse")
    adapter = _value(options.adapter_type, "ide")
    hw_version = options.hwversion if options.hwversion is not None else "4"
    tools = options.toolsversion if options.toolsversion is not None else "2147483647"
    zeroed = bool(options.zeroed_grain)
    heads = 16 if adapter == "ide" else 255
    split = subformat in ("twoGbMaxExtentFlat", "twoGbMaxExtentSparse")
    flat = subformat in ("monolithicFlat", "twoGbMaxExtentFlat")
    compress = subformat == "streamOptimized"
    if flat and options.backing_file:
        raise QmpError("Flat image can't have backing file")
    if flat and zeroed:
        raise QmpError("Flat image can't enable zeroed grain")
    line_fmt = 'RW {} FLAT "{}" 0\n' if flat else 'RW {} SPARSE "{}"\n'
    extent_size = SPLIT_SIZE if split else size
    created = size if not split and not flat else 0
    opened = _Opened(graph)
    try:
        desc_node = await opened.open(options.file)
        lines = ""
        if not split and not flat:
            await _init_extent(desc_node, created, False, compress, zeroed)
            lines += line_fmt.format(-(-created // SECTOR), os.path.basename(desc_node.filename))
        else:
            await desc_node.truncate(0)
        parent_cid = 0xFFFFFFFF
        parent_line = ""
        if options.backing_file:
            parent_cid = await _parent_cid(graph, desc_node, options.backing_file)
            parent_line = f'parentFileNameHint="{options.backing_file}"'[: BUF_SIZE - 1]
        refs = list(options.extents or [])
        idx = 1
        while created < size:
            cur = min(size - created, extent_size)
            if idx > len(refs):
                raise QmpError(f"Extent [{idx - 1}] not specified")
            node = await opened.open(refs[idx - 1])
            await _init_extent(node, cur, flat, compress, zeroed)
            lines += line_fmt.format(-(-cur // SECTOR), os.path.basename(node.filename))
            created += cur
            idx += 1
        if idx <= len(refs):
            try:
                await opened.open(refs[idx - 1])
            except QmpError:
                pass  # QEMU looks with errors ignored: an unopenable one goes unnoticed
            else:
                raise QmpError("List of extents contains unused extents")
        text = desc.render(
            cid=random.getrandbits(32),
            parent_cid=parent_cid,
            create_type=subformat,
            parent_line=parent_line,
            extent_lines_text=lines,
            hw_version=hw_version,
            size=size,
            heads=heads,
            adapter_type=adapter,
            tools_version=tools,
        )
        at = 0x200 if not split and not flat else 0
        if at + len(text) > desc_node.length:
            await desc_node.truncate(at + len(text))
        await desc_node.write(at, text)
        if at == 0:
            await desc_node.truncate(len(text))
        for node in {desc_node, *opened.temp}:
            await node.flush()
    finally:
        await opened.close()
