"""The backup job (QEMU's block/backup.c, with the checks of blockdev.c's do_backup_common and
the copy-before-write part of block/copy-before-write.c).

A backup is a point-in-time copy: the target ends up holding the source exactly as it was when
the job was created. Two things make that true, both built on one :class:`BlockCopy`:

* a **copy-before-write filter** inserted above the source (``drivers/cbw.py``), which takes
  over every parent of the source: before any write passes it, the old contents of the
  clusters it touches are copied to the target (or the write waits for the background task
  already copying them);
* a **background loop** that copies every cluster of the copy bitmap that is still dirty.

The sync mode only seeds the copy bitmap: everything (full, none), the top layer's allocated
clusters (top), or the user's bitmap frozen at job creation (bitmap/incremental). With
``sync=none`` only the hook copies and the job runs until cancelled.

The user's bitmap follows QEMU's successor protocol: it is frozen when the job is created and
a successor records new writes; on success (or ``always``) the successor replaces it, on failure
(or ``never``) it is merged back, so no dirty bit is ever lost.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blockd.bitmap.dirty import ALLOW_RO, DEFAULT, DirtyBitmap, find_bitmap
from blockd.block.driver import WriteFlags
from blockd.block.drivers.cbw import CopyBeforeWriteDriver
from blockd.block.graph import MAX_NAME, check_id
from blockd.block.node import BlockNode, BlockUser
from blockd.block.perm import ChildRole, Perm, perm_update
from blockd.copy.block_copy import DEFAULT_WORKERS, BlockCopy, BlockCopyError, cluster_size_for
from blockd.errors import QmpError, strerror
from blockd.job.blockjob import BlockJob
from blockd.job.core import JobTxn
from blockd.job.joblog import fmt_bytes
from blockd.qapi.job import BlockdevOnError, JobType
from blockd.qapi.job import JobStatus as S

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph
    from blockd.job.manager import JobManager

log = logging.getLogger(__name__)

INT_MAX = 2**31 - 1
#: Upper bound of tasks in flight whatever x-perf asks (QEMU allows 64).
MAX_WORKERS = 64
_BLOCKER = "block device is in use by block job: backup"


@dataclass
class BackupParams:
    """The arguments of blockdev-backup/drive-backup after QAPI defaults were applied."""

    job_id: str | None
    sync: str
    speed: int = 0
    bitmap: str | None = None
    bitmap_mode: str | None = None
    compress: bool = False
    on_source_error: BlockdevOnError = BlockdevOnError.REPORT
    on_target_error: BlockdevOnError = BlockdevOnError.REPORT
    auto_finalize: bool = True
    auto_dismiss: bool = True
    filter_node_name: str | None = None
    #: x-perf max-workers; None: blockd's default (DEFAULT_WORKERS tasks in flight).
    max_workers: int | None = None
    max_chunk: int = 0

    @classmethod
    def from_args(cls, args: Any) -> BackupParams:
        perf = args.x_perf
        return cls(
            job_id=args.job_id,
            sync=args.sync.value,
            speed=args.speed or 0,
            bitmap=args.bitmap,
            bitmap_mode=args.bitmap_mode.value if args.bitmap_mode else None,
            compress=bool(args.compress),
            on_source_error=args.on_source_error or BlockdevOnError.REPORT,
            on_target_error=args.on_target_error or BlockdevOnError.REPORT,
            auto_finalize=args.auto_finalize is not False,
            auto_dismiss=args.auto_dismiss is not False,
            filter_node_name=args.filter_node_name,
            max_workers=None if perf is None else perf.max_workers,
            max_chunk=0 if perf is None or perf.max_chunk is None else perf.max_chunk,
        )


class BackupJob(BlockJob):
    """One backup. Created (and its hook installed) by :func:`create_backup_job`; started by
    the transaction that created it.

    **Runs in:** the event loop; :meth:`run` is the job task, the hook runs in the tasks of
    whoever writes to the source.
    """

    job_type = JobType.BACKUP

    def __init__(
        self,
        manager: JobManager,
        job_id: str,
        source: BlockNode,
        target: BlockNode,
        params: BackupParams,
        bcs: BlockCopy,
        sync_bitmap: DirtyBitmap | None,
        *,
        owns_target: bool = False,
    ) -> None:
        super().__init__(
            manager,
            job_id,
            auto_finalize=params.auto_finalize,
            auto_dismiss=params.auto_dismiss,
        )
        # -- immutable after creation
        self.source = source
        self.target = target
        self.sync = params.sync
        self.bitmap_mode = params.bitmap_mode
        self.sync_bitmap = sync_bitmap
        self.bcs = bcs
        workers = params.max_workers
        self.max_workers = DEFAULT_WORKERS if workers is None else min(workers, MAX_WORKERS)
        self.owns_target = owns_target
        self.on_source_error = params.on_source_error
        self.on_target_error = params.on_target_error
        self.user = BlockUser(f"backup job '{job_id}'")
        self.progress_total = bcs.copy_bitmap.count() if sync_bitmap else source.length
        bcs.on_progress = self._progress
        bcs.on_skip = self._skip
        bcs.on_task = self.account  # every task counts against the speed limit
        # -- changes while running
        #: The copy-before-write filter above the source while the job holds the graph.
        self.cbw: BlockNode | None = None
        self._cleaned = False
        #: Copy-before-write calls in progress; once the job is over (``_dropping``) new
        #: writes no longer copy, and the filter goes when the last call has returned.
        self._cbw_calls = 0
        self._cbw_idle = asyncio.Event()
        self._cbw_idle.set()
        self._dropping = False

    # -- progress (called by the copy engine) -------------------------------------------
    def _progress(self, nbytes: int) -> None:
        self.progress_current += nbytes

    def _skip(self, nbytes: int) -> None:
        self.progress_total = max(self.progress_current, self.progress_total - nbytes)

    # -- setup and teardown --------------------------------------------------------------
    def install(self, graph: BlockGraph, filter_node_name: str | None) -> None:
        """Insert the copy-before-write filter above the source and take the nodes, in one
        permission update (QEMU's bdrv_cbw_append and block_job_create). Synchronous, so the
        point in time is exactly now: no write can slip between seeding and hooking.

        **Raises** QmpError (QEMU's permission texts); then nothing is left attached."""
        cbw = graph.new_filter(CopyBeforeWriteDriver, filter_node_name)
        driver = cbw.driver
        assert isinstance(driver, CopyBeforeWriteDriver)
        bcs = self.bcs
        driver.progress = lambda: (bcs.cluster_size, bcs.copy_bitmap.count() * bcs.cluster_size)
        cbw.before_write_hooks.append(self._cbw)
        with perm_update() as upd:
            graph.insert_filter(
                cbw, self.source, (("target", self.target, ChildRole.DATA),), update=upd
            )
            self.user.attach(cbw, Perm(0), Perm.all(), name="main node", update=upd)
            self.user.attach(
                self.target, Perm(0), Perm.all(), name="target", update=upd, backend=False
            )
        self.cbw = cbw
        self.target.blockers[self] = _BLOCKER

    def uninstall(self) -> None:
        """Synchronous undo of :meth:`install`: the filter goes, the source's parents are
        back on it. Nodes the job owned are freed by whoever opened them."""
        self._unhook()
        for edge in list(self.user.edges):
            self.user.detach_sync(edge)

    def _unhook(self) -> None:
        cbw, self.cbw = self.cbw, None
        if cbw is not None:
            cbw.before_write_hooks.clear()
            cbw.graph.remove_filter(cbw)
        self.target.blockers.pop(self, None)

    async def _cbw(self, node: BlockNode, offset: int, nbytes: int) -> None:
        """Copy-before-write: the old data must reach the target before the write proceeds;
        if that fails, the write fails (QEMU's default on-cbw-error=break-guest-write)."""
        if self._dropping:
            return  # the job is over: nobody needs the old data any more
        self._cbw_calls += 1
        self._cbw_idle.clear()
        try:
            await self.bcs.copy(offset, nbytes)
        except BlockCopyError as exc:
            raise OSError(exc.errno, strerror(exc.errno)) from exc
        finally:
            self._cbw_calls -= 1
            if not self._cbw_calls:
                self._cbw_idle.set()

    def describe(self) -> str:
        out = f"{self.source.node_name} -> {self.target.node_name}, sync={self.sync}"
        if self.sync_bitmap is not None:
            out += f", bitmap={self.sync_bitmap.name} ({self.bitmap_mode})"
        return f"{out}, {fmt_bytes(self.progress_total)} to copy"

    # -- job hooks -----------------------------------------------------------------------
    async def run(self) -> None:
        if self.sync == "none":
            while True:  # only copy-before-write works; ends by cancel
                await self.sleep(3600)
        if self.sync == "top":
            await self.bcs.reset_unallocated(self)
        # after ignore, or a resume after stop: retry what is still dirty
        while not await self.copy_round(self.bcs, 0, self.bcs.len, max_workers=self.max_workers):
            pass
        # Durable before it is reported done (QSD does not flush): a copy of the target taken
        # right after BLOCK_JOB_COMPLETED, or a power cut then, finds the whole backup. A
        # failed flush fails the job: the backup may not be on disk.
        self.error_cause = f"flushing target '{self.target.node_name}'"
        await self.target.flush()
        self.error_cause = None

    async def commit(self) -> None:
        self._resolve_sync_bitmap(success=True)

    async def abort(self) -> None:
        self._resolve_sync_bitmap(success=False)

    def _resolve_sync_bitmap(self, success: bool) -> None:
        """QEMU's backup_cleanup_sync_bitmap: abdicate or reclaim per bitmap-mode."""
        bm = self.sync_bitmap
        if bm is None or bm.successor is None:
            return
        mode = self.bitmap_mode
        sync = (success or mode == "always") and mode != "never"
        bm = bm.abdicate() if sync else bm.reclaim()
        if not success and mode == "always":
            bm.merge_from(self.bcs.copy_bitmap)  # what was not copied stays dirty
        self.sync_bitmap = bm

    async def clean(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        # A write inside the filter may be copying to the target right now: the filter and
        # the target stay until it is done (QEMU drains the filter before dropping it).
        # Writes arriving meanwhile skip the copy, so this wait is bounded.
        self._dropping = True
        while self._cbw_calls:
            await self._cbw_idle.wait()
        self._unhook()
        await self.user.detach_all()

    async def user_cancel(self, force: bool) -> None:
        """QEMU enters an idle (sleeping) job's coroutine right inside the cancel command, so
        a throttled or sync=none backup finishes before the reply; do the same by waiting for
        the job here when it was idle. A job busy with I/O, or paused, answers first."""
        idle = self.started and not self.busy and not self.paused
        await super().user_cancel(force)
        task = self.task
        if idle and task is not None and not task.done():
            await asyncio.wait({task}, timeout=5)

    # -- transaction support -------------------------------------------------------------
    def start_drained(self) -> None:
        """Start inside a transaction's drained section: QSD shows ``running`` then
        ``paused`` for each new job, and ``running`` again when the drain ends
        (:meth:`end_drain`). The coroutine is only created then, so jobs begin work in the
        order the drain releases them, as in QEMU."""
        self.joblog.started(self.describe())
        self.started = True
        self.busy = True
        self._transition(S.RUNNING)
        self._transition(S.PAUSED)

    def end_drain(self) -> None:
        if self.status == S.PAUSED and self.task is None:
            self._transition(S.RUNNING)
            self.task = asyncio.create_task(self._main(), name=f"job-{self.id}")


def _check_bitmap_args(source: BlockNode, p: BackupParams) -> DirtyBitmap | None:
    """blockdev.c's do_backup_common: the sync/bitmap/bitmap-mode combinations, in QEMU's
    order and words. Desugars incremental into bitmap + on-success."""
    if p.sync in ("bitmap", "incremental") and p.bitmap is None:
        raise QmpError(f"must provide a valid bitmap name for '{p.sync}' sync mode")
    if p.sync == "incremental":
        if p.bitmap_mode is not None and p.bitmap_mode != "on-success":
            raise QmpError(
                "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"
            )
        p.sync, p.bitmap_mode = "bitmap", "on-success"
    bm: DirtyBitmap | None = None
    if p.bitmap is not None:
        bm = find_bitmap(source, p.bitmap)
        if bm is None:
            raise QmpError(f"Bitmap '{p.bitmap}' could not be found")
        if p.bitmap_mode is None:
            raise QmpError("Bitmap sync mode must be given when providing a bitmap")
        bm.check(ALLOW_RO)
        if p.sync == "none":
            raise QmpError("sync mode 'none' does not produce meaningful bitmap outputs")
        if p.bitmap_mode == "never" and p.sync != "bitmap":
            raise QmpError(
                f"Bitmap sync mode 'never' has no meaningful effect when combined with sync "
                f"mode '{p.sync}'"
            )
    elif p.bitmap_mode is not None:
        raise QmpError("Cannot specify bitmap sync mode without a bitmap")
    return bm


def _check_filter_name(graph: Any, name: str | None) -> None:
    """QEMU names the copy-before-write filter *name*; its checks, with QEMU's prefix."""
    if name is None:
        return
    try:
        check_id(name)
        if len(name) > MAX_NAME:
            raise QmpError("Node name too long")
        if graph.find(name) is not None:
            raise QmpError(f"Duplicate nodes with node-name='{name}'")
    except QmpError as exc:
        raise QmpError(f"Could not create node: {exc.desc}") from None


def create_backup_job(
    manager: JobManager,
    graph: Any,
    source: BlockNode,
    target: BlockNode,
    params: BackupParams,
    txn: JobTxn | None,
    *,
    owns_target: bool = False,
) -> BackupJob:
    """Validate, freeze the bitmap, install copy-before-write and create the job
    (``created``), all in QEMU's order so the first error is QEMU's. Not started.

    **Raises** QmpError; on error nothing is left behind (successor reclaimed, hook removed).
    """
    p = params
    bm = _check_bitmap_args(source, p)
    # backup_job_create()
    if source is target:
        raise QmpError("Source and target cannot be the same")
    if p.compress and not target.driver.supports_compressed_writes:
        raise QmpError(f"Compression is not supported for this drive {_device_name(target)}")
    source.check_not_busy()
    target.check_not_busy()
    if p.max_workers is not None and not 1 <= p.max_workers <= INT_MAX:
        raise QmpError(f"max-workers must be between 1 and {INT_MAX}")
    if p.max_chunk < 0:
        raise QmpError("max-chunk must be zero (which means no limit) or positive")
    if bm is not None and p.bitmap_mode != "never":
        bm.check(DEFAULT)
    successor_made = False
    job: BackupJob | None = None
    try:
        if bm is not None:
            bm.create_successor()
            successor_made = True
        if source.length != target.length:
            raise QmpError("Source and target image have different sizes")
        _check_filter_name(graph, p.filter_node_name)
        cluster = cluster_size_for(target)
        if p.max_chunk and p.max_chunk < cluster:
            raise QmpError(
                f"Required max-chunk ({p.max_chunk}) is less than backup cluster size ({cluster})"
            )
        flags = WriteFlags.NONE
        if p.compress:
            flags |= WriteFlags.COMPRESSED
        bcs = BlockCopy(
            source,
            target,
            cluster_size=cluster,
            skip_unallocated=p.sync == "top",
            max_chunk=p.max_chunk,
            write_flags=flags,
        )
        if bm is not None:
            bcs.copy_bitmap.merge(bm.hb)
        else:
            bcs.copy_bitmap.set_all()
        job = BackupJob(
            manager, p.job_id or "", source, target, p, bcs, bm, owns_target=owns_target
        )
        job.install(graph, p.filter_node_name)
        manager.check_new_id(p.job_id)
    except BaseException:
        if job is not None:
            job.uninstall()
        if successor_made and bm is not None:
            bm.reclaim()
        raise
    job.create(txn)
    if p.speed:
        try:
            job.set_speed(p.speed)
        except QmpError:
            # QSD: ``created``, then ``null``, then the error; the job never ran.
            job.uninstall()
            if bm is not None:
                bm.reclaim()
            if job.txn is not None and job in job.txn.jobs:
                job.txn.jobs.remove(job)
            job.dismiss()
            raise
    return job


def _device_name(node: BlockNode) -> str:
    """QEMU prints the BlockBackend name here, which nodes in QSD never have."""
    return ""
