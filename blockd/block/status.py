"""Block status flags and extents (QEMU's BDRV_BLOCK_* and the map output of qemu-img)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blockd.block.node import BlockNode


class BlockStatus(enum.IntFlag):
    """What a range is. ``ALLOCATED`` means this node (not its backing) decides the content."""

    DATA = 0x01
    ZERO = 0x02
    OFFSET_VALID = 0x04
    ALLOCATED = 0x08
    EOF = 0x20


@dataclass(slots=True)
class Extent:
    """One answer of ``block_status``: *length* bytes from *offset* share *flags*.

    ``map_node``/``map_offset`` say where the bytes live when ``OFFSET_VALID`` is set (the
    protocol node and the host offset), which is what ``qemu-img map`` prints. ``depth`` counts
    backing layers below the queried node, 0 being the node itself.
    """

    offset: int
    length: int
    flags: BlockStatus
    map_node: BlockNode | None = None
    map_offset: int | None = None
    depth: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length
