"""The ``null-co`` driver (QEMU's block/null.c): a sink of a given size, for tests and
benchmarks. Writes vanish; reads give zeroes."""

from __future__ import annotations

import asyncio
from typing import Any

from blockd.block.driver import BlockDriver, WriteFlags, register_driver
from blockd.block.status import BlockStatus, Extent
from blockd.errors import QmpError

GiB = 1024**3


@register_driver
class NullDriver(BlockDriver):
    format_name = "null-co"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.size = GiB
        self.latency_ns = 0
        self.read_zeroes = False

    async def open(self, options: Any, graph: Any) -> None:
        self.size = GiB if options.size is None else options.size
        self.latency_ns = options.latency_ns or 0
        self.read_zeroes = bool(options.read_zeroes)
        if self.size >= 2**63:
            raise QmpError("Invalid size for null-co")

    def getlength(self) -> int:
        return self.size

    async def _latency(self) -> None:
        if self.latency_ns:
            await asyncio.sleep(self.latency_ns / 1e9)

    async def preadv(self, offset: int, nbytes: int) -> bytes:
        await self._latency()
        return bytes(nbytes)

    async def pwritev(self, offset: int, data: memoryview, flags: WriteFlags) -> None:
        await self._latency()

    async def pwrite_zeroes(self, offset: int, nbytes: int, flags: WriteFlags) -> None:
        await self._latency()

    async def block_status(self, offset: int, nbytes: int) -> Extent:
        flags = BlockStatus.OFFSET_VALID | BlockStatus.ALLOCATED
        flags |= BlockStatus.ZERO if self.read_zeroes else BlockStatus.DATA
        return Extent(offset, nbytes, flags, map_node=self.node, map_offset=offset)

    async def flush(self) -> None:
        return

    def filename(self) -> str:
        opts = {k: v for k, v in self.node.options.items() if k not in ("node-name", "driver")}
        return "null-co://" if not opts else self.node.json_filename()

    def actual_size(self) -> int | None:
        return 0
