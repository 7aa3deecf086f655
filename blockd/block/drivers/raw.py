"""The ``raw`` format driver (QEMU's block/raw-format.c): the child's bytes, optionally through
an ``offset``/``size`` window."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockd.block.driver import BlockDriver, WriteFlags, register_driver
from blockd.block.perm import ChildRole, Perm
from blockd.block.status import Extent
from blockd.errors import QmpError

if TYPE_CHECKING:
    from blockd.block.node import BlockNode


@register_driver
class RawDriver(BlockDriver):
    format_name = "raw"
    is_format = True

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.offset = 0
        self.size: int | None = None

    @property
    def child(self) -> BlockNode:
        return self.node.children["file"].node

    async def open(self, options: Any, graph: Any) -> None:
        role = (
            ChildRole.filtered()
            if options.offset is None and options.size is None
            else ChildRole.image()
        )
        await graph.open_child(self.node, options.file, "file", role)
        file_len = self.child.length
        self.offset = options.offset or 0
        if options.size is not None and options.size % 512:
            raise QmpError("Specified size is not multiple of 512")
        if options.size is not None or self.offset:
            size = options.size if options.size is not None else file_len - self.offset
            if self.offset > file_len or self.offset + size > file_len:
                raise QmpError(
                    f"The sum of offset ({self.offset}) and size ({size}) has to be smaller or "
                    f"equal to the  actual size of the containing file ({file_len})"
                )
            self.size = size
        self.limits = self.child.driver.limits

    def child_perm(self, role: ChildRole, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # Take write and resize only when a parent wants them: a bare raw node on a file
        # must not keep other users from writing it (QEMU's raw_child_perm).
        nperm, nshared = super().child_perm(role, perm, shared)
        grow = Perm.WRITE | Perm.RESIZE
        return (nperm & ~grow) | (perm & grow), nshared

    def getlength(self) -> int:
        return self.size if self.size is not None else self.child.length

    async def preadv(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        return await self.child.read(offset + self.offset, nbytes)

    async def pwritev(self, offset: int, data: memoryview, flags: WriteFlags) -> None:
        await self.child.write(offset + self.offset, data, flags)

    async def pwrite_zeroes(self, offset: int, nbytes: int, flags: WriteFlags) -> None:
        await self.child.write_zeroes(offset + self.offset, nbytes, flags)

    async def pdiscard(self, offset: int, nbytes: int) -> None:
        await self.child.discard(offset + self.offset, nbytes)

    async def block_status(self, offset: int, nbytes: int) -> Extent:
        ext = await self.child.block_status(offset + self.offset, nbytes)
        ext.offset -= self.offset
        return ext

    async def truncate(self, size: int, exact: bool, prealloc: str) -> None:
        if self.size is not None or self.offset:
            raise QmpError("Cannot resize fixed-size raw disks")
        await self.child.truncate(size, exact, prealloc)

    def filename(self) -> str:
        if self.size is None and not self.offset:
            return str(self.child.filename)
        return self.node.json_filename()

    def image_info(self) -> dict[str, Any]:
        # raw_get_info asks the child: what its bdrv_get_info gives (file: a dirty flag;
        # qcow2: cluster size too; ssh, nbd: nothing) shows here too.
        info = self.child.driver.image_info()
        return {k: info[k] for k in ("cluster-size", "dirty-flag") if k in info}

    def actual_size(self) -> int | None:
        return self.child.driver.actual_size()

    def has_zero_init(self) -> bool:
        return self.child.driver.has_zero_init()
