"""The filters of mirror and commit jobs (QEMU's bdrv_mirror_top in block/mirror.c and
bdrv_commit_top in block/commit.c).

``mirror_top`` sits above the source of a mirror or an active commit and takes over every
parent of the source, so every guest write passes it: in the background copy mode the job only
needs to know that the range changed (the source's own dirty tracking tells it), in the
write-blocking mode this filter writes the data to the target as well before the guest's write
completes (:meth:`MirrorTopDriver.pwritev` hands it to the job).

``commit_top`` sits above the top of an intermediate commit. It passes data through and takes no
permissions of its own: it exists so that the nodes between top and base are held by the job and
so that the overlay's backing link, which the commit moves onto the base at the end, is a link
to a node the job owns.

Both hang their child as ``backing``, as QEMU does, which query-named-block-nodes shows as a
backing image of depth one more than the child's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from blockd.block.driver import WriteFlags, register_driver
from blockd.block.drivers.filter import FilterDriver
from blockd.block.perm import ChildRole, Perm

if TYPE_CHECKING:
    from blockd.block.node import BlockNode


class ActiveWriter(Protocol):
    """What mirror_top needs of its job in write-blocking mode (:class:`MirrorJob`)."""

    def copies_writes(self) -> bool: ...

    async def active_write(
        self, offset: int, nbytes: int, data: memoryview | None, flags: WriteFlags, kind: str
    ) -> None: ...


@register_driver
class MirrorTopDriver(FilterDriver):
    format_name = "mirror_top"
    child_name = "backing"

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        #: The job, once it runs; None before and after.
        self.job: ActiveWriter | None = None
        #: Active commit: the target is in the source's backing chain.
        self.is_commit = False
        #: The job is ending: nothing is passed on to the child any more (so that the job
        #: can hand the source's permissions to the target before the pivot).
        self.stop = False

    def child_perm(self, role: ChildRole, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        if self.stop:
            return Perm(0), Perm.all()
        nperm, nshared = super().child_perm(role, perm, shared)
        if self.is_commit:
            # The nodes above the base cannot give consistent reads to anybody while the
            # commit writes into the base, and writes to the base must be allowed through.
            nperm &= ~Perm.CONSISTENT_READ
            nshared |= Perm.WRITE
        return nperm, nshared

    async def pwritev(self, offset: int, data: memoryview, flags: WriteFlags) -> None:
        job = self.job
        if job is not None and job.copies_writes():
            # The caller may reuse its buffer once we return; both writes need the same bytes.
            await job.active_write(offset, len(data), memoryview(bytes(data)), flags, "data")
            return
        await self.child.write(offset, data, flags)

    async def pwrite_zeroes(self, offset: int, nbytes: int, flags: WriteFlags) -> None:
        job = self.job
        if job is not None and job.copies_writes():
            await job.active_write(offset, nbytes, None, flags, "zero")
            return
        await self.child.write_zeroes(offset, nbytes, flags)

    async def pdiscard(self, offset: int, nbytes: int) -> None:
        job = self.job
        if job is not None and job.copies_writes():
            await job.active_write(offset, nbytes, None, WriteFlags.NONE, "discard")
            return
        await self.child.discard(offset, nbytes)


@register_driver
class CommitTopDriver(FilterDriver):
    format_name = "commit_top"
    child_name = "backing"

    def child_perm(self, role: ChildRole, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        return Perm(0), Perm.all()

    def image_info(self) -> dict[str, Any]:
        return {}
