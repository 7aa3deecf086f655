"""The stream job (QEMU's block/stream.c, with the checks of blockdev.c's qmp_block_stream).

A stream copies into a node (*device*) every range that an image between it and the base
holds while the node does not, then makes the base (or nothing) the node's backing, in the
graph and in the image header. Afterwards the images it streamed from are out of the chain
but unchanged: they still describe their own point in time.

How the guest is kept safe while that happens:

* A **copy-on-read filter** (``drivers/cor.py``) is inserted above the node and takes over
  its parents, so guest reads of ranges still in the intermediate images copy them up as
  well; the filter freezes the chain from itself down to the last image copied from, so no
  graph change can take an image away under the job.
* Every copy is one **copy-on-read request** on the node (``BlockNode.copy_on_read``),
  serialised against guest writes and checking the node's allocation inside: stale backing
  data never overwrites what the guest wrote, and the guest reads the same bytes before,
  during and after the job.
* The **backing change** at the end happens in a drained section, after every range is in
  the node, and the header is rewritten behind a flush of all data and metadata: a crash
  leaves either the old header (the chain reads the same data) or the new one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockd.block.chain import (
    chain_contains,
    chain_nodes,
    filter_or_cow,
    find_backing_image,
    find_overlay,
    release_backing,
    swap_backing,
)
from blockd.block.drivers.cor import CopyOnReadDriver
from blockd.block.node import BlockNode, BlockUser
from blockd.block.perm import Perm, perm_update
from blockd.block.snapshot import reopen_read_only
from blockd.copy.stream_copy import WORKERS, StreamCopy
from blockd.errors import QmpError, strerror
from blockd.job.blockjob import BlockJob
from blockd.qapi.job import BlockdevOnError, JobType

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph
    from blockd.job.manager import JobManager
    from blockd.qapi.stream import BlockStream

log = logging.getLogger(__name__)

BLOCKER = "block device is in use by block job: stream"
#: What the job lets others do with the node it streams into, and with the images it
#: streams from (QEMU's basic_flags): nobody resizes either, nobody writes the images below.
_BASIC = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED


@dataclass
class StreamPlan:
    """The nodes a stream works on, resolved from the arguments (QEMU's stream_start)."""

    device: BlockNode
    #: The last image copied from (QEMU's base_overlay).
    bottom: BlockNode
    #: The node right above the new backing; only filters lie between it and *bottom*.
    above_base: BlockNode
    backing_file: str | None


class StreamJob(BlockJob):
    """One stream. **Runs in:** the event loop; :meth:`run` is the job task, the filter's
    copy-on-read runs in the tasks of whoever reads the node."""

    job_type = JobType.STREAM

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        graph: BlockGraph,
        plan: StreamPlan,
        on_error: BlockdevOnError,
        *,
        auto_finalize: bool,
        auto_dismiss: bool,
    ) -> None:
        super().__init__(manager, job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        # -- immutable after creation
        self.graph = graph
        self.plan = plan
        self.on_source_error = on_error
        self.user = BlockUser(f"stream job '{job_id}'")
        #: The job's own BlockBackend on the filter (QEMU's s->blk).
        self.blk = BlockUser("an unnamed block device")
        # -- changes while running
        self.cor: BlockNode | None = None
        self.frozen = False
        self.reopened_rw = False
        self.first_error = 0
        self._cleaned = False

    @property
    def nothing_to_stream(self) -> bool:
        return self.plan.device.skip_filters() is self.plan.bottom

    # -- setup ---------------------------------------------------------------------------
    def insert_filter(self, filter_node_name: str | None) -> None:
        """Put the copy-on-read filter above the device and freeze the chain it copies
        from (QEMU's bdrv_insert_node with cor_open). **Raises** QmpError with QEMU's
        "Could not create node" / "Could not replace node" texts; then nothing changed."""
        p, graph = self.plan, self.graph
        try:
            cor = graph.new_filter(CopyOnReadDriver, filter_node_name)
            graph.check_chain_not_frozen(p.device, p.bottom)
        except QmpError as exc:
            raise QmpError(f"Could not create node: {exc.desc}") from None
        driver = cor.driver
        assert isinstance(driver, CopyOnReadDriver)
        driver.bottom = p.bottom
        graph.insert_filter(cor, p.device)
        graph.freeze_chain(cor, p.bottom, True)
        self.cor, self.frozen = cor, True

    def take_nodes(self) -> None:
        """The job's users of the graph (QEMU's block_job_add_bdrv calls and s->blk), in one
        permission update, and the op blockers that make other commands answer "busy".
        **Raises** QmpError (a permission conflict); then none is held."""
        assert self.cor is not None
        p = self.plan
        base = filter_or_cow(p.above_base)
        first = filter_or_cow(p.device)
        intermediates = chain_nodes(first, base) if first is not None else []
        with perm_update() as upd:
            self.blk.attach(
                self.cor, Perm.CONSISTENT_READ, _BASIC | Perm.WRITE, name="root", update=upd
            )
            self.user.attach(
                p.device, Perm(0), _BASIC | Perm.WRITE, "active node", upd, backend=False
            )
            for node in intermediates:
                self.user.attach(node, Perm(0), _BASIC, "intermediate node", upd, backend=False)
        for node in (self.cor, p.device, *intermediates):
            node.blockers[self] = BLOCKER

    # -- the work ------------------------------------------------------------------------
    async def run(self) -> None:
        p = self.plan
        if self.nothing_to_stream:
            return
        cor = self.cor
        assert cor is not None and isinstance(cor.driver, CopyOnReadDriver)
        self.progress_total = p.device.length
        bcs = StreamCopy(
            p.device, p.bottom.cow_backing(), cor.driver.populate, on_ignored=self._ignored
        )
        bcs.copy_bitmap.set_all()
        bcs.on_progress = self._progress
        bcs.on_skip = self._progress
        bcs.on_task = self.account  # only copies count against the speed limit
        # ``ignore`` is applied per range by StreamCopy; a stop resumed retries what is left.
        while not await self.copy_round(bcs, 0, bcs.len, max_workers=WORKERS):
            pass
        if self.first_error:
            # QEMU: an error that was ignored still keeps the backing chain as it was.
            raise OSError(self.first_error, strerror(self.first_error))

    def _progress(self, nbytes: int) -> None:
        self.progress_current += nbytes

    def _ignored(self, err: int) -> bool:
        """``on-error`` for one failed copy: only ``ignore`` goes on past it (the others end
        the run, where :meth:`run` applies them once)."""
        if self.on_source_error != BlockdevOnError.IGNORE:
            return False
        self.error_action(True, err)
        self.first_error = self.first_error or err
        return True

    # -- completion ----------------------------------------------------------------------
    async def prepare(self) -> None:
        """Success: drop the filter, then make the base the device's backing, in the graph
        and in the image header (QEMU's stream_prepare)."""
        p = self.plan
        node = p.device.skip_filters()
        had_backing = node.cow_backing() is not None
        self._drop_filter()
        base = filter_or_cow(p.above_base)
        plain_base = base.skip_filters() if base is not None else None
        if not had_backing:
            return
        name = fmt = None
        if plain_base is not None:
            name = p.backing_file if p.backing_file is not None else plain_base.filename
            fmt = plain_base.drv
        try:
            async with self.graph.drained(node):
                old = swap_backing(self.graph, node, base)
        except QmpError as exc:
            log.error("stream %s: %s", self.id, exc.desc)
            raise OSError(1, strerror(1)) from None  # QEMU: -EPERM
        await release_backing(self.graph, old)
        await node.driver.change_backing_file(name, fmt)

    async def clean(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        self._drop_filter()
        for node in (self.plan.device, *[e.node for e in self.user.edges]):
            node.blockers.pop(self, None)
        for edge in list(self.user.edges) + list(self.blk.edges):
            (self.user if edge in self.user.edges else self.blk).detach_sync(edge)
        if self.reopened_rw:
            try:
                await reopen_read_only(self.plan.device, True)
            except (OSError, QmpError) as exc:
                log.error("stream %s: reopening read-only failed: %s", self.id, exc)

    def _drop_filter(self) -> None:
        cor, self.cor = self.cor, None
        if cor is None:
            return
        cor.blockers.pop(self, None)
        for edge in [e for e in self.blk.edges if e.node is cor]:
            self.blk.detach_sync(edge)
        if self.frozen:
            self.graph.freeze_chain(cor, self.plan.bottom, False)
            self.frozen = False
        self.graph.remove_filter(cor)

    def early_fail(self) -> None:
        """Undo a creation that failed after the filter went in (QEMU's job_early_fail path):
        the filter goes, the device is read-only again if it was."""
        self._cleaned = True
        self._drop_filter()
        for node in (self.plan.device, *[e.node for e in self.user.edges]):
            node.blockers.pop(self, None)
        for edge in list(self.user.edges):
            self.user.detach_sync(edge)


async def plan_stream(graph: BlockGraph, args: BlockStream) -> StreamPlan:
    """Resolve and check the arguments in QEMU's order and words (qmp_block_stream and the
    first part of stream_start). **Raises** QmpError."""
    if args.base is not None and args.base_node is not None:
        raise QmpError("'base' and 'base-node' cannot be specified at the same time")
    if args.base is not None and args.bottom is not None:
        raise QmpError("'base' and 'bottom' cannot be specified at the same time")
    if args.bottom is not None and args.base_node is not None:
        raise QmpError("'bottom' and 'base-node' cannot be specified at the same time")
    device = graph.lookup(args.device, args.device)
    base: BlockNode | None = None
    bottom: BlockNode | None = None
    if args.base is not None:
        base = await find_backing_image(device, args.base)
        if base is None:
            raise QmpError(f"Can't find '{args.base}' in the backing chain")
    if args.base_node is not None:
        base = graph.lookup(args.base_node)
        if base is device or not chain_contains(device, base):
            raise QmpError(f"Node '{args.base_node}' is not a backing image of '{args.device}'")
    if args.bottom is not None:
        bottom = graph.lookup(args.bottom)
        if bottom.driver.is_filter:
            raise QmpError(f"Node '{args.bottom}' is a filter, use a non-filter node as 'bottom'")
        if not chain_contains(device, bottom):
            raise QmpError(f"Node '{args.bottom}' is not in a chain starting from '{args.device}'")
    stop = filter_or_cow(bottom) if bottom is not None else base
    for node in chain_nodes(device, stop):
        node.check_not_busy()
    if base is None and args.backing_file is not None:
        raise QmpError("backing file specified, but streaming the entire chain")
    if bottom is not None:
        return StreamPlan(device, bottom, bottom, args.backing_file)
    overlay = find_overlay(device, base)
    if overlay is None:
        assert base is not None
        raise QmpError(f"'{base.node_name}' is not in the backing chain of '{device.node_name}'")
    above = overlay
    if overlay.cow_backing() is not base and base is not None:
        # Filters between the overlay and the base: the new backing link starts below them.
        cur = overlay.backing
        while cur is not None and filter_or_cow(cur) is not base:
            cur = filter_or_cow(cur)
        above = cur or overlay
    return StreamPlan(device, overlay, above, args.backing_file)


async def start_stream(manager: JobManager, graph: BlockGraph, args: BlockStream) -> StreamJob:
    """``block-stream``: check, insert the filter, create and start the job. A stream with
    nothing to copy completes before this returns, as in QEMU (its coroutine never yields).

    **Raises** QmpError; a failure after the job was created shows it going to ``null``."""
    plan = await plan_stream(graph, args)
    job = StreamJob(
        manager,
        args.job_id or "",
        graph,
        plan,
        args.on_error or BlockdevOnError.REPORT,
        auto_finalize=args.auto_finalize is not False,
        auto_dismiss=args.auto_dismiss is not False,
    )
    device = plan.device
    if device.read_only:
        # QEMU holds the chain during the reopen, so nothing can change it meanwhile.
        graph.freeze_chain(device, plan.above_base, True)
        try:
            await reopen_read_only(device, False)
        finally:
            graph.freeze_chain(device, plan.above_base, False)
        job.reopened_rw = True
    try:
        job.insert_filter(args.filter_node_name)
    except BaseException:
        await _reopen_back(job)
        raise
    try:
        job.create()
    except BaseException:
        job.early_fail()
        await _reopen_back(job)
        raise
    assert job.cor is not None
    try:
        job.user.attach(job.cor, Perm(0), Perm.all(), name="main node", backend=False)
        if args.speed:
            job.set_speed(args.speed)
        job.take_nodes()
    except BaseException:
        job.early_fail()
        if job.txn is not None and job in job.txn.jobs:
            job.txn.jobs.remove(job)
        job.dismiss()
        await _reopen_back(job)
        raise
    if not job.nothing_to_stream:
        job.progress_total = device.length
    job.start()
    if job.nothing_to_stream and job.task is not None:
        await asyncio.wait({job.task})
    return job


async def _reopen_back(job: StreamJob) -> None:
    if job.reopened_rw:
        job.reopened_rw = False
        await reopen_read_only(job.plan.device, True)
