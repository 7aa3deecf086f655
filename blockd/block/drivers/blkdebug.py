"""The ``blkdebug`` filter (QEMU's block/blkdebug.c): fails chosen requests on purpose so
that every job's error path can be driven from a test.

blockd raises a rule's event from the request that passes through the filter (``read_aio``
for reads, ``write_aio``/``pwritev`` for writes, ``pwritev_zero`` for write-zeroes,
``flush_to_disk``/``flush_to_os`` for flushes; ``none`` matches by ``iotype`` only), which is
how the rules are used in practice; events deep inside a format driver are not modelled.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blockd.block.driver import BlockDriver, WriteFlags, register_driver
from blockd.block.perm import ChildRole
from blockd.block.status import Extent
from blockd.errors import QmpError

if TYPE_CHECKING:
    from blockd.block.node import BlockNode

_EVENTS_BY_IOTYPE = {
    "read": {"read_aio", "read_backing_aio", "read_compressed", "cow_read", "none"},
    "write": {"write_aio", "pwritev", "cow_write", "write_compressed", "pwritev_done", "none"},
    "write-zeroes": {"pwritev_zero", "write_aio", "pwritev", "none"},
    "discard": {"none"},
    "flush": {"flush_to_disk", "flush_to_os", "none"},
    "block-status": {"none"},
}


_INT_MAX = 2**31 - 1
_SIZE_OPTIONS = (
    "align",
    "max-transfer",
    "opt-write-zero",
    "max-write-zero",
    "opt-discard",
    "max-discard",
)


def _check_ranges(options: Any) -> dict[str, int]:
    """The size options, refused as QEMU refuses them before opening the image: QAPI
    declares all but ``align`` int32, and QEMU reads every one as an unsigned size."""
    sizes: dict[str, int] = {}
    for name in _SIZE_OPTIONS:
        value = getattr(options, name.replace("-", "_")) or 0
        if name != "align" and not -(2**31) <= value <= _INT_MAX:
            raise QmpError(f"Parameter '{name}' expects int32_t")
        sizes[name] = value
    for name in _SIZE_OPTIONS:
        if sizes[name] < 0:
            raise QmpError(f"Parameter '{name}' expects a non-negative number below 2^64")
    return sizes


def _check_constraints(sizes: dict[str, int], child_align: int) -> None:
    """QEMU's blkdebug_open checks, in its order: each limit must be below INT_MAX and a
    multiple of the alignment (the maximum ones of their optimum too)."""
    align = sizes["align"]
    if align and (align >= _INT_MAX or align & (align - 1)):
        raise QmpError(f"Cannot meet constraints with align {align}")
    base = max(align, child_align, 1)
    multiple_of = {
        "max-transfer": base,
        "opt-write-zero": base,
        "max-write-zero": max(sizes["opt-write-zero"], base),
        "opt-discard": base,
        "max-discard": max(sizes["opt-discard"], base),
    }
    for name, unit in multiple_of.items():
        value = sizes[name]
        if value and (value >= _INT_MAX or value % unit):
            raise QmpError(f"Cannot meet constraints with {name} {value}")


@dataclass
class _Rule:
    event: str
    iotype: str | None
    errno: int
    sector: int | None
    once: bool
    state: int | None


@register_driver
class BlkdebugDriver(BlockDriver):
    format_name = "blkdebug"
    is_filter = True

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.rules: list[_Rule] = []
        self.state = 1
        self.transitions: list[tuple[str, int | None, int]] = []

    @property
    def child(self) -> BlockNode:
        return self.node.children["image"].node

    async def open(self, options: Any, graph: Any) -> None:
        sizes = _check_ranges(options)
        await graph.open_child(self.node, options.image, "image", ChildRole.filtered())
        for r in options.inject_error or []:
            self.rules.append(
                _Rule(
                    event=str(r.event.value),
                    iotype=str(r.iotype.value) if r.iotype else None,
                    errno=_errno.EIO if r.errno is None else r.errno,
                    sector=r.sector,
                    once=bool(r.once),
                    state=r.state,
                )
            )
        for s in options.set_state or []:
            self.transitions.append((str(s.event.value), s.state, s.new_state))
        # A copy: the child's own limits stay as they are for its other parents and after
        # this filter is gone.
        limits = dataclasses.replace(self.child.driver.limits)
        _check_constraints(sizes, limits.request_alignment)
        if sizes["align"]:
            limits.request_alignment = sizes["align"]
        if sizes["max-transfer"]:
            limits.max_transfer = sizes["max-transfer"]
        if sizes["opt-write-zero"]:
            limits.pwrite_zeroes_alignment = sizes["opt-write-zero"]
        if sizes["max-write-zero"]:
            limits.max_pwrite_zeroes = sizes["max-write-zero"]
        if sizes["opt-discard"]:
            limits.pdiscard_alignment = sizes["opt-discard"]
        self.limits = limits

    def _check(self, iotype: str, offset: int, nbytes: int) -> None:
        events = _EVENTS_BY_IOTYPE[iotype]
        for ev, st, new in self.transitions:
            if ev in events and (st is None or st == self.state):
                self.state = new
        for rule in list(self.rules):
            if rule.event not in events or (rule.iotype and rule.iotype != iotype):
                continue
            if rule.state is not None and rule.state != self.state:
                continue
            if rule.sector is not None:
                pos = rule.sector * 512
                if not (offset <= pos < offset + max(nbytes, 1)):
                    continue
            if rule.once:
                self.rules.remove(rule)
            if rule.errno:
                raise OSError(rule.errno, f"blkdebug: injected error ({iotype})")

    def getlength(self) -> int:
        return int(self.child.length)

    async def preadv(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        self._check("read", offset, nbytes)
        return await self.child.read(offset, nbytes)

    async def pwritev(self, offset: int, data: memoryview, flags: WriteFlags) -> None:
        self._check("write", offset, len(data))
        await self.child.write(offset, data, flags)

    async def pwrite_zeroes(self, offset: int, nbytes: int, flags: WriteFlags) -> None:
        self._check("write-zeroes", offset, nbytes)
        await self.child.write_zeroes(offset, nbytes, flags)

    async def pdiscard(self, offset: int, nbytes: int) -> None:
        self._check("discard", offset, nbytes)
        await self.child.discard(offset, nbytes)

    async def block_status(self, offset: int, nbytes: int) -> Extent:
        self._check("block-status", offset, nbytes)
        return await self.child.block_status(offset, nbytes)

    async def flush(self) -> None:
        self._check("flush", 0, 0)
        await self.child.flush()

    async def truncate(self, size: int, exact: bool, prealloc: str) -> None:
        await self.child.truncate(size, exact, prealloc)

    def has_zero_init(self) -> bool:
        return bool(self.child.driver.has_zero_init())
