"""Intermediate block-commit (QEMU's block/commit.c): the data of the layers from ``top`` down
to just above ``base`` is copied into ``base``; then the overlay above ``top`` backs onto
``base`` (its image header rewritten) and the committed layers leave the chain.

A ``commit_top`` filter goes above ``top`` for the job's lifetime, so that the overlay's backing
link is a link to a node the job owns, and the chain from it down to the base is frozen: nothing
can change which nodes the job works on. The base is reopened read-write for the job and goes
back to read-only after.

The copy is the shared engine (:class:`~blockd.copy.block_copy.BlockCopy`) with base-aware block
status: ranges no layer above the base allocates are skipped (and count as progress, as in QEMU,
whose commit reports the virtual size as its length). Under a speed limit it moves in QEMU's
512 KiB steps, so progress and throttling look the same as in qemu-storage-daemon.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from blockd.block.drivers.mirror_top import CommitTopDriver
from blockd.block.node import BlockNode, BlockUser
from blockd.block.perm import ChildRole, Perm, perm_update
from blockd.block.snapshot import reopen_read_only
from blockd.copy.block_copy import BlockCopy
from blockd.errors import QmpError
from blockd.job.blockjob import BlockJob
from blockd.qapi.job import BlockdevOnError, JobType

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph
    from blockd.job.manager import JobManager

log = logging.getLogger(__name__)

KiB = 1024
#: QEMU's COMMIT_BUFFER_SIZE: the step under a speed limit.
COMMIT_BUFFER_SIZE = 512 * KiB
_BLOCKER = "block device is in use by block job: commit"


class CommitJob(BlockJob):
    """One intermediate commit; built by :func:`start_commit`."""

    job_type = JobType.COMMIT

    def __init__(
        self,
        manager: JobManager,
        graph: BlockGraph,
        job_id: str,
        bs: BlockNode,
        top: BlockNode,
        base: BlockNode,
        *,
        on_error: BlockdevOnError,
        backing_file: str | None,
        auto_finalize: bool,
        auto_dismiss: bool,
    ) -> None:
        super().__init__(manager, job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        # -- immutable after creation
        self.graph = graph
        self.bs = bs
        self.top = top
        self.base = base
        self.backing_file = backing_file
        self.on_source_error = self.on_target_error = on_error
        self.user = BlockUser(f"commit job '{job_id}'")
        self.base_user = BlockUser("an unnamed block device")
        # -- changes while running
        self.filter: BlockNode | None = None
        self.base_was_read_only = base.read_only
        self.chain_frozen = False
        self._done = False

    # -- setup ---------------------------------------------------------------------------
    async def install(self, filter_node_name: str | None) -> None:
        """QEMU's commit_start after the job exists: base read-write, commit_top above top,
        the nodes held, the chain frozen. **Raises** QmpError; the caller then calls
        :meth:`uninstall`."""
        graph, top, base = self.graph, self.top, self.base
        if self.base_was_read_only:
            await reopen_drained(graph, base, False)
        node = graph.new_filter(CommitTopDriver, filter_node_name)
        graph.insert_filter(node, top)
        node.read_only = True  # it never writes (QEMU opens it without BDRV_O_RDWR)
        self.filter = node
        base_under = base.skip_filters()
        with perm_update() as upd:
            self.user.attach(self.bs, Perm(0), Perm.all(), "main node", upd, False)
            cur: BlockNode | None = top
            while cur is not None and cur is not base:
                shared = Perm.WRITE_UNCHANGED | Perm.WRITE
                if cur.skip_filters() is base_under:
                    shared |= Perm.CONSISTENT_READ
                self.user.attach(cur, Perm(0), shared, "intermediate node", upd, False)
                cur = cur.filtered_child() if cur.driver.is_filter else cur.backing
        graph.freeze_chain(node, base, True)
        self.chain_frozen = True
        with perm_update() as upd:
            self.user.attach(base, Perm(0), Perm.all(), "base", upd, False)
            perm = Perm.CONSISTENT_READ | Perm.WRITE
            if base.length < top.length:
                perm |= Perm.RESIZE
            self.base_user.attach(
                base, perm, Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED, "root", upd
            )
            self.base_user.attach(top, Perm(0), Perm.all(), "top", upd)
        for edge in self.user.edges:
            edge.node.blockers[self] = _BLOCKER

    async def uninstall(self) -> None:
        self._release_nodes()
        self._remove_filter()
        await self._restore_base()

    def _release_nodes(self) -> None:
        if self.chain_frozen and self.filter is not None:
            self.graph.freeze_chain(self.filter, self.base, False)
            self.chain_frozen = False
        for n in list(self.graph.nodes.values()):
            n.blockers.pop(self, None)
        for user in (self.user, self.base_user):
            for edge in list(user.edges):
                user.detach_sync(edge)

    def _remove_filter(self) -> None:
        node, self.filter = self.filter, None
        if node is not None and self.graph.find(node.node_name) is node:
            self.graph.remove_filter(node)

    async def _restore_base(self) -> None:
        if self.base_was_read_only and not self.base.read_only:
            try:
                await reopen_drained(self.graph, self.base, True)
            except (OSError, QmpError) as exc:
                log.warning("reopening %s read-only failed: %s", self.base.node_name, exc)

    # -- the job ---------------------------------------------------------------------------
    async def run(self) -> None:
        top, base = self.top, self.base
        length = top.length
        if base.length < length:
            await base.truncate(length)
        self.progress_total = length
        bcs = BlockCopy(
            top,
            base,
            skip_unallocated=True,
            status_base=base,
            max_chunk=COMMIT_BUFFER_SIZE if self.speed else 0,
            on_progress=self._progress,
            on_skip=self._progress,
            on_task=self.account,
        )
        bcs.copy_bitmap.set_all()
        while not await self.copy_round(bcs, 0, length):
            if self.speed:
                bcs.max_chunk = COMMIT_BUFFER_SIZE

    def _progress(self, nbytes: int) -> None:
        self.progress_current += nbytes

    # -- completion ----------------------------------------------------------------------
    async def prepare(self) -> None:
        """QEMU's commit_prepare and bdrv_drop_intermediate: every parent of the filter moves
        to the base; overlays record the base as their backing file."""
        graph, base, node = self.graph, self.base, self.filter
        assert node is not None
        self._release_nodes()
        async with graph.drained(node, base):
            parents = [e for e in node.parents if isinstance(e.parent, BlockNode)]
            name = self.backing_file if self.backing_file is not None else base.filename
            graph.replace(node, base)
            for edge in parents:
                overlay = edge.parent
                if not isinstance(overlay, BlockNode) or not edge.role & ChildRole.COW:
                    continue
                await _update_backing_link(overlay, name, base.drv)
        self._remove_filter()
        self._done = True

    async def abort(self) -> None:
        self._release_nodes()
        async with self.graph.drained(*(n for n in (self.filter,) if n is not None)):
            self._remove_filter()

    async def clean(self) -> None:
        self._release_nodes()
        self._remove_filter()
        await self._restore_base()


async def reopen_drained(graph: BlockGraph, node: BlockNode, read_only: bool) -> None:
    """Switch *node* between read-only and read-write with its users held meanwhile (QEMU's
    bdrv_reopen drains the node itself)."""
    async with graph.drained(node):
        await reopen_read_only(node, read_only)


async def _update_backing_link(overlay: BlockNode, name: str, fmt: str) -> None:
    """Record the new backing file in *overlay*'s header; a read-only overlay is reopened
    read-write for that, and back (QEMU's bdrv_backing_update_filename)."""
    read_only = overlay.read_only
    if read_only:
        await reopen_read_only(overlay, False)
    try:
        await overlay.driver.change_backing_file(name, fmt)
    except OSError as exc:
        raise QmpError(f"Could not update backing file link: {exc.strerror}") from exc
    finally:
        if read_only:
            await reopen_read_only(overlay, True)


async def start_commit(
    manager: JobManager,
    graph: BlockGraph,
    job_id: str | None,
    bs: BlockNode,
    top: BlockNode,
    base: BlockNode,
    *,
    speed: int,
    on_error: BlockdevOnError,
    backing_file: str | None,
    filter_node_name: str | None,
    auto_finalize: bool,
    auto_dismiss: bool,
) -> CommitJob:
    """QEMU's commit_start: checks, the job, the graph, then start."""
    if top.skip_filters() is base.skip_filters():
        raise QmpError("Invalid files for merge: top and base are the same")
    job = CommitJob(
        manager,
        graph,
        job_id or "",
        bs,
        top,
        base,
        on_error=on_error,
        backing_file=backing_file,
        auto_finalize=auto_finalize,
        auto_dismiss=auto_dismiss,
    )
    manager.check_new_id(job_id)
    job.create()
    try:
        if speed:
            job.set_speed(speed)  # QSD: ``created``, then ``null``, then the error
        await job.install(filter_node_name)
    except BaseException:
        await job.uninstall()
        job.dismiss()
        raise
    job.start()
    return job
