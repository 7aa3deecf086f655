"""The mirror job and the active commit built on it (QEMU's block/mirror.c).

A ``mirror_top`` filter is inserted above the source and takes over its parents, so every guest
write passes it. The job keeps a **live** copy bitmap in the shared copy engine
(:class:`~blockd.copy.block_copy.BlockCopy`): it starts with what the sync mode selects (the
whole chain's allocated data, the top layer's, or nothing) and a tracker on the source sets bits
again for every guest write that lands after (:class:`_DirtyFeed`). The engine copies until no
bit is set and nothing is in flight; that moment is READY. From then on the job keeps copying
what the guest changes.

``copy-mode=write-blocking``: guest writes go to the target as well before they complete
(:meth:`MirrorJob.active_write`); ranges the job is still copying are waited for, so the target
sees every write in order.

Completion (``block-job-complete``) and a cancel after READY both stop the guest's I/O at the
source, copy what is still dirty, and then either move every parent of the source onto the
target (complete) or leave the graph as it was with the target a point-in-time copy (cancel,
which ends with BLOCK_JOB_COMPLETED). A cancel before READY, or a force cancel, ends with
BLOCK_JOB_CANCELLED.

An active commit is the same job with the base as target: the chain from the filter down to the
base is frozen, the nodes between are held by the job, and complete pivots every parent of the
top onto the base.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blockd.block.driver import WriteFlags
from blockd.block.drivers.mirror_top import MirrorTopDriver
from blockd.block.node import BlockNode, BlockUser, inside_graph, leave_graph
from blockd.block.perm import ChildRole, Perm, perm_update, refresh
from blockd.block.snapshot import reopen_read_only
from blockd.copy.block_copy import BlockCopy
from blockd.errors import QmpError, strerror
from blockd.job.blockjob import BlockJob
from blockd.job.core import JobCancelled
from blockd.qapi.job import BlockdevOnError, JobType

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph
    from blockd.job.manager import JobManager

log = logging.getLogger(__name__)

MiB = 1024 * 1024
#: QEMU's DEFAULT_MIRROR_BUF_SIZE: the data the copy may have in flight.
DEFAULT_BUF_SIZE = 16 * MiB
#: Copies in flight (QEMU's MAX_IN_FLIGHT).
MAX_IN_FLIGHT = 16
#: How long a job in sync sleeps when nothing is dirty; a guest write wakes it at once.
IDLE_SLEEP = 1.0
#: At completion, at most this much dirty data is copied while the guest is held.
FINAL_COPY_MAX = 64 * MiB
#: Rounds that end with dirty data before the job copies the rest with the guest held.
HELD_AFTER_ROUNDS = 3


def default_granularity(target: BlockNode) -> int:
    """The target's cluster size within [4 KiB, 64 KiB], 64 KiB without one (QEMU's
    bdrv_get_default_bitmap_granularity)."""
    cluster = target.driver.info_cluster_size()
    if cluster is not None and cluster > 0:
        return max(4096, min(cluster, 65536))
    return 65536


def is_root(node: BlockNode) -> bool:
    """Only users that are not nodes nor job links above it (QEMU's bdrv_is_root_node)."""
    return all(isinstance(e.parent, BlockUser) and e.backend for e in node.parents)


def chain_contains(top: BlockNode, node: BlockNode) -> bool:
    """*node* is *top* or below it through filters and backing links."""
    cur: BlockNode | None = top
    while cur is not None:
        if cur is node:
            return True
        cur = cur.filtered_child() if cur.driver.is_filter else cur.backing
    return False


@dataclass
class MirrorParams:
    job_id: str
    sync: str = "full"
    speed: int = 0
    granularity: int = 0
    buf_size: int = 0
    on_source_error: BlockdevOnError = BlockdevOnError.REPORT
    on_target_error: BlockdevOnError = BlockdevOnError.REPORT
    unmap: bool = True
    copy_mode: str = "background"
    auto_finalize: bool = True
    auto_dismiss: bool = True
    filter_node_name: str | None = None
    replaces: str | None = None
    #: At completion: "leave" the target's backing alone, attach the "source" chain's base
    #: (drive-mirror absolute-paths), or "open" the one its header names (mode=existing).
    backing_mode: str = "leave"
    #: The target may hold old data where the source reads zeroes (sync=full into an
    #: existing image): those ranges are zeroed or copied too.
    zero_target: bool = False


#: Set while a write-blocking guest write writes the source: the target gets the same data
#: right after, so the range is not dirty.
_ACTIVE_WRITE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "blockd_mirror_active_write", default=False
)


class _DirtyFeed:
    """The job's tracker on the source (QEMU's mirror dirty bitmap, which
    query-named-block-nodes lists on the source): every write that reaches the source while
    the job does not copy writes itself marks its range for copying again."""

    def __init__(self, job: MirrorJob) -> None:
        self.job = job

    def is_recording(self) -> bool:
        # Decided per write, not per mode: a write that passed the filter before the job
        # copied writes itself (or while it no longer does) must be recorded.
        return not _ACTIVE_WRITE.get()

    def set_range(self, offset: int, nbytes: int) -> None:
        self.job.bcs.mark_dirty(offset, nbytes)

    def resize(self, size: int) -> None:
        """The source cannot be resized while the job runs (it holds the permission)."""

    def info(self) -> dict[str, Any]:
        bcs = self.job.bcs
        return {
            "recording": True,
            "persistent": False,
            "busy": False,
            "granularity": bcs.cluster_size,
            "count": bcs.dirty_bytes(),
        }


class MirrorJob(BlockJob):
    """One mirror (or active commit). Built by :func:`start_mirror`."""

    job_type = JobType.MIRROR

    def __init__(
        self,
        manager: JobManager,
        graph: BlockGraph,
        source: BlockNode,
        target: BlockNode,
        p: MirrorParams,
        *,
        base: BlockNode | None,
        is_commit: bool,
        owns_target: bool,
    ) -> None:
        super().__init__(
            manager, p.job_id, auto_finalize=p.auto_finalize, auto_dismiss=p.auto_dismiss
        )
        # -- immutable after creation
        self.graph = graph
        self.source = source
        self.target = target
        self.base = base
        self.is_commit = is_commit
        self.owns_target = owns_target
        self.sync = p.sync
        self.copy_mode = p.copy_mode
        self.backing_mode = p.backing_mode
        self.zero_target = p.zero_target
        self.replaces = p.replaces
        self.unmap = p.unmap
        self.on_source_error = p.on_source_error
        self.on_target_error = p.on_target_error
        self.granularity = p.granularity or default_granularity(target)
        buf = p.buf_size or DEFAULT_BUF_SIZE
        self.buf_size = -(-buf // self.granularity) * self.granularity
        self.user = BlockUser(f"{self.job_type.value} job '{p.job_id}'")
        #: The job's own user of the target (QEMU's target BlockBackend).
        self.target_user = BlockUser("an unnamed block device")
        self.bcs = BlockCopy(
            source,
            target,
            cluster_size=self.granularity,
            max_chunk=min(self.buf_size, 4 * MiB),
            zero_flags=WriteFlags.MAY_UNMAP if p.unmap else WriteFlags.NONE,
            max_bytes_in_flight=self.buf_size,
            count_zero_tasks=False,
            on_progress=self._progress,
            on_task=self.account,
        )
        self.bcs.copy_bitmap.reset_all()
        self.bcs.on_dirty = self._dirtied
        self.feed = _DirtyFeed(self)
        # -- changes while running
        self.top: BlockNode | None = None
        self.should_complete = False
        self.to_replace: BlockNode | None = None
        #: A failed write-blocking target write whose policy was ``report`` (QEMU's s->ret).
        self.write_error = 0
        self.base_was_read_only = False
        self._quiesced: list[BlockNode] | None = None
        #: Sleeping until the guest writes something (in sync, nothing to copy).
        self._idle = False
        self._prepared = False
        self._cleaned = False

    # -- progress ------------------------------------------------------------------------
    def _progress(self, nbytes: int) -> None:
        self.progress_current += nbytes
        self._update_total(finishing=nbytes)

    def _update_total(self, finishing: int = 0) -> None:
        """Total is what was done plus what is dirty or in flight (QEMU's
        job_progress_set_remaining in the mirror loop); *finishing*: the bytes of a task
        that counted as done but is still registered in flight."""
        bcs = self.bcs
        left = bcs.dirty_bytes() + bcs.bytes_in_flight() - finishing
        self.progress_total = self.progress_current + max(left, 0)

    def _dirtied(self) -> None:
        # Only a job waiting for work is woken: one sleeping for its speed limit must not be
        # woken by every guest write.
        if self._idle:
            self.enter()

    # -- the write-blocking path (called by mirror_top) ----------------------------------
    def copies_writes(self) -> bool:
        return (
            self.copy_mode == "write-blocking"
            and not self.write_error
            and not self.force_cancel
            and self.top is not None
            and not self._prepared
        )

    async def active_write(
        self, offset: int, nbytes: int, data: memoryview | None, flags: WriteFlags, kind: str
    ) -> None:
        src = self.source
        async with self.bcs.active_write(offset, nbytes):
            token = _ACTIVE_WRITE.set(True)
            try:
                if kind == "data":
                    assert data is not None
                    await src.write(offset, data, flags)
                elif kind == "zero":
                    await src.write_zeroes(offset, nbytes, flags)
                else:
                    await src.discard(offset, nbytes)
            finally:
                _ACTIVE_WRITE.reset(token)
            await self._sync_target_write(offset, nbytes, data, flags, kind)

    async def _sync_target_write(
        self, offset: int, nbytes: int, data: memoryview | None, flags: WriteFlags, kind: str
    ) -> None:
        """The guest's data goes to the target too; clusters still dirty at either end are
        left to the background copy (QEMU's do_sync_target_write)."""
        g = self.granularity
        bm = self.bcs.copy_bitmap
        start, end = offset, offset + nbytes
        if start % g and bm.get(start):
            start = start - start % g + g
        if end % g and bm.get(end - 1):
            end -= end % g
        if start >= end:
            return
        a, b = -(-start // g) * g, end - end % g
        if a < b:
            bm.reset(a, b - a)
        self.progress_total += end - start
        try:
            if kind == "data":
                assert data is not None
                await self.target.write(start, data[start - offset : end - offset], flags)
            elif kind == "zero":
                await self.target.write_zeroes(start, end - start, flags)
            else:
                await self.target.discard(start, end - start)
        except OSError as exc:
            lo, hi = start - start % g, -(-end // g) * g
            bm.set(lo, hi - lo)
            err = exc.errno or errno.EIO
            if self.error_action(False, err) == "report" and not self.write_error:
                self.write_error = err
            self.enter()
            return
        self.progress_current += end - start

    # -- setup ---------------------------------------------------------------------------
    def insert_top(self, filter_node_name: str | None) -> None:
        """Insert mirror_top above the source (QEMU's bdrv_append in mirror_start_job).
        **Raises** QmpError; then the graph is as before."""
        top = self.graph.new_filter(MirrorTopDriver, filter_node_name)
        drv = top.driver
        assert isinstance(drv, MirrorTopDriver)
        drv.is_commit = self.is_commit
        self.graph.insert_filter(top, self.source)
        self.top = top

    def take_nodes(self) -> None:
        """Take the filter, source, target (and for a commit the nodes between) with the
        permissions QEMU's mirror_start_job takes, in one update. **Raises** QmpError; then
        nothing of it is left attached."""
        src, target, top = self.source, self.target, self.top
        assert top is not None
        keep_all = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE
        with perm_update() as upd:
            self.user.attach(top, Perm.CONSISTENT_READ, keep_all, "main node", upd, False)
            tperm, tshared = Perm.WRITE, Perm.WRITE_UNCHANGED
            if self.is_commit:
                if target.length < src.length:
                    tperm |= Perm.RESIZE
                tshared |= Perm.CONSISTENT_READ | Perm.WRITE
            elif chain_contains(src, target.skip_filters()):
                raise QmpError(
                    "Cannot mirror to a filter on top of a node in the source's backing chain"
                )
            self.target_user.attach(target, tperm, tshared, "root", upd)
            self.user.attach(src, Perm(0), keep_all, "source", upd, False)
            self.user.attach(target, Perm(0), Perm.all(), "target", upd, False)
            if self.is_commit:
                self._hold_intermediates(upd)
        if self.is_commit:
            self.graph.freeze_chain(top, target, True)
        src.dirty_bitmaps.append(self.feed)
        reason = f"block device is in use by block job: {self.job_type.value}"
        for n in (src, target, top):
            n.blockers[self] = reason

    def _hold_intermediates(self, upd: Any) -> None:
        """Active commit: the nodes between top and base vanish from the chain at the end;
        the job holds them so nothing else starts on them."""
        shared = Perm.WRITE_UNCHANGED | Perm.WRITE
        base = self.target.skip_filters()
        cur = self.source.backing if not self.source.driver.is_filter else None
        cur = self.source.filtered_child() if self.source.driver.is_filter else cur
        while cur is not None and cur is not self.target:
            if cur.skip_filters() is base:
                shared |= Perm.CONSISTENT_READ
            self.user.attach(cur, Perm(0), shared, "intermediate node", upd, False)
            cur.blockers[self] = f"block device is in use by block job: {self.job_type.value}"
            cur = cur.filtered_child() if cur.driver.is_filter else cur.backing

    def uninstall(self) -> None:
        """Undo :meth:`install` for a job that never ran."""
        top, self.top = self.top, None
        self._drop_hooks()
        for user in (self.user, self.target_user):
            for edge in list(user.edges):
                user.detach_sync(edge)
        if top is not None:
            drv = top.driver
            assert isinstance(drv, MirrorTopDriver)
            drv.stop = True
            self.graph.remove_filter(top)

    def _drop_hooks(self) -> None:
        src = self.source
        if self.feed in src.dirty_bitmaps:
            src.dirty_bitmaps.remove(self.feed)
        for n in list(self.graph.nodes.values()):
            n.blockers.pop(self, None)
        if self.top is not None:
            drv = self.top.driver
            assert isinstance(drv, MirrorTopDriver)
            drv.job = None
            if self.is_commit:
                self.graph.freeze_chain(self.top, self.target, False)

    # -- the job ---------------------------------------------------------------------------
    async def run(self) -> None:
        src, target = self.source, self.target
        length = src.length
        if self.is_commit:
            if length > target.length:
                await target.truncate(length)
        elif length != target.length:
            raise QmpError("Source and target image have different sizes")
        top = self.top
        assert top is not None
        drv = top.driver
        assert isinstance(drv, MirrorTopDriver)
        drv.job = self
        if length == 0:
            self.emit_ready()
            while not self.cancelled and not self.should_complete:
                await self.sleep(3600)
            await self._quiesce()
            return
        await self._dirty_init()
        rounds_dirty = 0
        while True:
            await self.pause_point()
            if self.write_error:
                raise OSError(self.write_error, strerror(self.write_error))
            if not await self._copy_round(length):
                continue
            self._update_total()
            if self.write_error:
                continue
            synced = False
            if self.bcs.dirty_bytes() and not self.is_ready:
                # A guest that never pauses can dirty some granule during every round, so
                # the bitmap is never seen empty (QEMU then never says READY). After a few
                # such rounds the remainder is copied with the guest held, as at completion.
                rounds_dirty += 1
                if rounds_dirty < HELD_AFTER_ROUNDS or not await self._finish(length):
                    continue
                self._unquiesce()
                synced = True  # _finish flushed the target while the guest was held
            rounds_dirty = 0
            if not self.is_ready:
                if not synced and not await self._flush_target():
                    continue
                # READY says the target was in sync once (QEMU does not look again after
                # the flush): what the guest wrote meanwhile is copied as usual. A job
                # cancelled meanwhile never says READY.
                if self.force_cancel:
                    raise JobCancelled
                self.emit_ready()
            if (self.should_complete or self.cancelled) and await self._finish(length):
                return
            if not self.bcs.dirty_bytes():
                self._idle = True
                try:
                    await self.sleep(IDLE_SLEEP)
                finally:
                    self._idle = False

    async def _copy_round(self, length: int) -> bool:
        """Copy until nothing is dirty or in flight; False after a failure whose policy
        says go on (ignore, or stop and then resumed)."""
        done = await self.copy_round(
            self.bcs, 0, length, max_workers=MAX_IN_FLIGHT, on_stop=self._unquiesce, one_pass=True
        )
        if not done:
            self._unquiesce()
        return done

    async def _finish(self, length: int) -> bool:
        """Stop the guest and look once more; True when the target is in sync with the
        guest held (the quiesce is then kept until the graph has changed).

        QEMU lets the guest go again whenever it finds new dirty data here, which under
        steady writes can put off the end for long. blockd copies that remainder with the
        guest held instead, when there is not much of it: the guest waits for a short copy
        and the job ends. Under a speed limit, up to what the limit copies in about a second
        (a throttled job under heavy writes would otherwise never end)."""
        await self._quiesce()
        dirty = self.bcs.dirty_bytes()
        # under a speed limit, at most about a second's worth keeps the guest waiting
        limit = max(self.speed, MiB) if self.rate_limited() else FINAL_COPY_MAX
        if dirty > limit:
            self._unquiesce()
            return False
        token = inside_graph()
        try:
            done = (not dirty or await self._copy_round(length)) and await self._flush_target()
        finally:
            leave_graph(token)
        if done and not self.bcs.dirty_bytes() and not self.write_error:
            return True
        self._unquiesce()
        return False

    async def _dirty_init(self) -> None:
        """Seed the bitmap (QEMU's mirror_dirty_init): the ranges allocated above the base
        the sync mode names; with zero_target the rest too (or it is zeroed first)."""
        src, bcs = self.source, self.bcs
        length = src.length
        if self.sync == "none":
            return
        if self.zero_target:
            if self.target.discard_mode != "unmap":
                bcs.copy_bitmap.set_all()
                self._update_total()
                return
            pos = 0
            while pos < length:
                await self.pause_point()
                n = min(length - pos, 1 << 30)
                await self.target.write_zeroes(pos, n, WriteFlags.MAY_UNMAP)
                pos += n
        base = self.base
        pos = 0
        while pos < length:
            await self.pause_point()
            allocated, n = await src.is_allocated_above(pos, length - pos, base)
            n = max(n, 1)
            if allocated:
                bcs.copy_bitmap.set(pos, n)
            pos += n
        self._update_total()

    async def _flush_target(self) -> bool:
        try:
            await self.target.flush()
        except OSError as exc:
            err = exc.errno or errno.EIO
            if self.error_action(False, err) == "report":
                raise
            return False
        return True

    async def _quiesce(self) -> None:
        if self._quiesced is None and self.top is not None:
            self._quiesced = await self.graph.quiesce_begin(self.top, self.target)

    def _unquiesce(self) -> None:
        held, self._quiesced = self._quiesced, None
        if held is not None:
            self.graph.quiesce_end(held)

    # -- verbs -----------------------------------------------------------------------------
    def on_cancel(self, force: bool) -> bool:
        """Before READY every cancel is a force cancel (QEMU's mirror_cancel)."""
        return force or not self.is_ready

    async def on_complete(self) -> None:
        if not self.is_ready:
            raise QmpError(f"The active block job '{self.id}' cannot be completed")
        if self.replaces is not None:
            node = self.graph.find(self.replaces)
            if node is None:
                raise QmpError(f"Node name '{self.replaces}' not found")
            self.to_replace = node
            node.blockers[self] = "block device is in use by block-job-complete"
        self.should_complete = True
        if not self.paused:
            self.enter()

    # -- completion ----------------------------------------------------------------------
    async def prepare(self) -> None:
        await self._exit(abort=False)

    async def abort(self) -> None:
        await self._exit(abort=True)

    async def _exit(self, abort: bool) -> None:
        """QEMU's mirror_exit_common: with the source quiesced, hand the target its backing,
        pivot (complete), and take the filter out. **Raises** OSError(EPERM) when the pivot
        is refused (the job then fails, and the graph is as before)."""
        if self._prepared:
            return
        self._prepared = True
        graph, target, top = self.graph, self.target, self.top
        if top is None:
            return
        await self._quiesce()
        token = inside_graph()
        failure: str | None = None
        try:
            self._drop_hooks()
            for edge in list(self.target_user.edges):
                self.target_user.detach_sync(edge)
            drv = top.driver
            assert isinstance(drv, MirrorTopDriver)
            drv.stop = True
            with perm_update() as upd:
                refresh([top], upd)
            if not abort:
                failure = await self._target_backing()
            if self.should_complete and not abort and failure is None:
                failure = await self._pivot()
            for edge in list(self.user.edges):
                self.user.detach_sync(edge)
            graph.remove_filter(top)
            self.top = None
        finally:
            leave_graph(token)
            self._unquiesce()
        back_ro = abort or not self.should_complete or failure is not None
        if self.is_commit and back_ro and self.base_was_read_only and not target.read_only:
            try:
                async with self.graph.drained(target):
                    await reopen_read_only(target, True)
            except (OSError, QmpError) as exc:
                log.warning("reopening %s read-only failed: %s", target.node_name, exc)
        if failure is not None:
            log.error("%s", failure)
            raise OSError(errno.EPERM, failure)

    async def _target_backing(self) -> str | None:
        """Give a drive-mirror target the backing chain its data needs."""
        target = self.target.skip_filters()
        if self.backing_mode == "source":
            backing = self.source if self.sync == "none" else self.base
            if target.cow_backing() is backing:
                return None
            try:
                old = target.children.get("backing")
                if old is not None:
                    await self.graph.detach(old)
                if backing is not None:
                    self.graph.attach(target, backing, "backing", ChildRole.backing())
                target.driver.on_backing_attached(backing)
            except QmpError as exc:
                return exc.desc
        elif self.backing_mode == "open" and target.backing is None:
            try:
                await target.driver.open_backing_from_header(self.graph)
            except QmpError as exc:
                return exc.desc
        return None

    async def _pivot(self) -> str | None:
        """Every parent of the source (or of ``replaces``) moves onto the target."""
        src, target = self.source, self.target
        to_replace = self.to_replace or src
        try:
            if to_replace.read_only != target.read_only:
                await reopen_read_only(target, to_replace.read_only)
            keep = set(self.user.edges)
            self.graph.replace(to_replace, target, keep=keep)
        except (OSError, QmpError) as exc:
            desc = exc.desc if isinstance(exc, QmpError) else str(exc)
            return f"Can no longer replace '{to_replace.node_name}' by '{target.node_name}': {desc}"
        return None

    async def clean(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        if self.top is not None:  # a job that failed before it ran
            await self._exit(abort=True)
        self._unquiesce()
        if self.to_replace is not None:
            self.to_replace.blockers.pop(self, None)
        for user in (self.user, self.target_user):
            await user.detach_all()
        if self.owns_target:
            await self.graph.maybe_free(self.target)


class ActiveCommitJob(MirrorJob):
    """An active commit: a mirror of the top into its own base (QEMU's
    commit_active_job_driver)."""

    job_type = JobType.COMMIT


def start_mirror(
    manager: JobManager,
    graph: BlockGraph,
    source: BlockNode,
    target: BlockNode,
    p: MirrorParams,
    *,
    base: BlockNode | None,
    is_commit: bool = False,
    owns_target: bool = False,
) -> MirrorJob:
    """Create, install and start a mirror in QEMU's order of checks (mirror_start_job).

    **Raises** QmpError; on error nothing is left attached (a drive-mirror target is the
    caller's to free).
    """
    if p.buf_size < 0:
        raise QmpError("Invalid parameter 'buf-size'")
    if source.skip_filters() is target.skip_filters():
        raise QmpError("Can't mirror node into itself")
    cls = ActiveCommitJob if is_commit else MirrorJob
    job = cls(
        manager, graph, source, target, p, base=base, is_commit=is_commit, owns_target=owns_target
    )
    job.insert_top(p.filter_node_name)
    try:
        manager.check_new_id(p.job_id)
    except QmpError:
        job.uninstall()
        raise
    job.create()
    try:
        if p.speed:
            job.set_speed(p.speed)  # QSD: ``created``, then ``null``, then the error
        job.take_nodes()
    except QmpError:
        job.uninstall()
        job.dismiss()
        raise
    job.start()
    return job


async def let_start(job: MirrorJob) -> None:
    """Give a new job the chance QEMU's job_start gives it: it runs until it first waits, so
    a job with nothing to copy is READY before the command replies."""
    for _ in range(8):
        if job.is_ready or job.is_completed:
            return
        await asyncio.sleep(0)
