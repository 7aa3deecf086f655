"""The QMP ``transaction`` command (QEMU's blockdev.c: qmp_transaction and the BlkActionOps).

Every action is an :class:`Action` with ``prepare`` (may fail, records what undo needs),
``commit`` (cannot fail), ``abort`` (undo a prepared action) and ``clean`` (always last).
Actions are prepared in list order; the first failure aborts every prepared action (the failing
one included, so ``abort`` copes with a half-done prepare) and the command returns that error.
Jobs are created in ``prepare`` and only started in ``commit``; a job of a failed transaction
goes ``created``, ``aborting``, ``concluded``, ``null`` without BLOCK_JOB_* events.

**Adding action types** (``blockdev-snapshot``, ``blockdev-snapshot-sync``): write an
:class:`Action` subclass, add it to :data:`ACTION_OPS` under its wire name, and add its wrapper
model in :mod:`blockd.qapi.transaction` (``ACTION_MODELS``).

Drain blips: QEMU drains every node at the start of a transaction and keeps each backup's
source drained until ``clean``, which shows as ``paused``/``running`` events of running jobs.
blockd reproduces the visible part: one blip per running job at the start, one for running
backup jobs that use an action's device, and ``running``, ``paused`` ... ``running`` for jobs
started by the transaction (see :meth:`BackupJob.start_drained`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from blockd.bitmap.dirty import DirtyBitmap, release
from blockd.bitmap.hbitmap import HBitmap
from blockd.block.driver import driver_class
from blockd.block.graph import _all_descendants
from blockd.block.node import BlockNode
from blockd.block.probe import probe_format
from blockd.block.snapshot import ExternalSnapshot
from blockd.errors import QmpError
from blockd.job.backup import BackupJob, BackupParams, create_backup_job
from blockd.job.blockjob import BlockJob
from blockd.job.core import JobTxn
from blockd.qapi.backup import MirrorSyncMode
from blockd.qapi.base import ArgsValidator
from blockd.qapi.job import JobStatus as S
from blockd.qapi.transaction import ActionCompletionMode, TransactionArgs
from blockd.qmp.commands import bitmaps as bmc
from blockd.qmp.commands.snapshot import snapshot_sync
from blockd.qmp.registry import Context, command

log = logging.getLogger(__name__)


@dataclass
class TxnState:
    """What the actions of one transaction share."""

    ctx: Context
    grouped: bool
    job_txn: JobTxn | None
    new_jobs: list[BackupJob] = field(default_factory=list)
    #: Nodes kept drained until ``clean`` (a backup drains its source), with nesting counts.
    drained: dict[BlockNode, int] = field(default_factory=dict)

    def drain_begin(self, node: BlockNode) -> None:
        self.drained[node] = self.drained.get(node, 0) + 1

    def drain_end(self, node: BlockNode) -> None:
        """Leave one drained section of *node*; when it is the last, release the new jobs
        that no other drained node still holds, newest first (QEMU walks a node's parents
        newest first)."""
        left = self.drained.get(node, 0) - 1
        if left > 0:
            self.drained[node] = left
            return
        self.drained.pop(node, None)
        for job in reversed(self.new_jobs):
            nodes = _job_nodes(job)
            if node in nodes and nodes.isdisjoint(self.drained):
                job.end_drain()


class Action:
    """One action of a transaction (QEMU's BlkActionOps)."""

    #: Allowed with completion-mode=grouped (only job actions are).
    supports_grouped: ClassVar[bool] = False
    #: Refuse grouped mode in prepare (abort does not check, as in QEMU).
    checks_grouped: ClassVar[bool] = True

    def __init__(self, state: TxnState, kind: str, data: Any) -> None:
        self.state = state
        self.kind = kind
        self.data = data

    @property
    def graph(self) -> Any:
        return self.state.ctx.daemon.graph

    async def prepare(self) -> None:
        if self.checks_grouped and self.state.grouped and not self.supports_grouped:
            raise QmpError(
                f"Action '{self.kind}' does not support Transaction property "
                "completion-mode = grouped"
            )

    def commit(self) -> None:
        """Make the action final; cannot fail."""

    async def abort(self) -> None:
        """Undo whatever :meth:`prepare` did (possibly only part of it)."""

    async def clean(self) -> None:
        """Runs after commit or abort."""


class AbortAction(Action):
    checks_grouped = False

    async def prepare(self) -> None:
        raise QmpError("Transaction aborted using Abort action")


class BitmapAddAction(Action):
    bitmap: DirtyBitmap | None = None

    async def prepare(self) -> None:
        await super().prepare()
        self.bitmap = bmc.bitmap_add(self.graph, self.data)

    async def abort(self) -> None:
        if self.bitmap is not None:
            release(self.bitmap.node, self.bitmap)


class BitmapRemoveAction(Action):
    """Prepare marks the bitmap busy (so later actions cannot use it) and hidden from
    storing; commit releases it; abort gives it back."""

    bitmap: DirtyBitmap | None = None
    _commit_task: asyncio.Future[None] | None = None

    async def prepare(self) -> None:
        await super().prepare()
        bm = bmc.bitmap_remove_prepare(self.graph, self.data)
        bm.busy = True
        bm.skip_store = True
        self.bitmap = bm

    def commit(self) -> None:
        bm = self.bitmap
        if bm is not None:
            bm.busy = False
            self._commit_task = asyncio.ensure_future(bmc.bitmap_remove_commit(bm))

    async def clean(self) -> None:
        if self._commit_task is not None:
            await self._commit_task

    async def abort(self) -> None:
        if self.bitmap is not None:
            self.bitmap.busy = False
            self.bitmap.skip_store = False


class _BitmapContentsAction(Action):
    """An action that changes a bitmap's bits; abort puts the saved bits back."""

    saved: tuple[DirtyBitmap, HBitmap] | None = None

    def change(self) -> tuple[DirtyBitmap, HBitmap]:
        raise NotImplementedError

    async def prepare(self) -> None:
        await super().prepare()
        self.saved = self.change()

    async def abort(self) -> None:
        if self.saved is not None:
            bm, hb = self.saved
            bm.hb.restore(hb)


class BitmapClearAction(_BitmapContentsAction):
    def change(self) -> tuple[DirtyBitmap, HBitmap]:
        return bmc.bitmap_clear_prepare(self.graph, self.data)


class BitmapEnableAction(Action):
    enable: ClassVar[bool] = True
    saved: tuple[DirtyBitmap, bool] | None = None

    async def prepare(self) -> None:
        await super().prepare()
        self.saved = bmc.bitmap_set_enabled(self.graph, self.data, self.enable)

    async def abort(self) -> None:
        if self.saved is not None:
            bm, was_disabled = self.saved
            bm.disabled = was_disabled


class BitmapDisableAction(BitmapEnableAction):
    enable = False


class BitmapMergeAction(_BitmapContentsAction):
    def change(self) -> tuple[DirtyBitmap, HBitmap]:
        return bmc.bitmap_merge_prepare(self.graph, self.data)


def _drain_node_blips(state: TxnState, node: BlockNode) -> None:
    """Running backup jobs whose nodes are *node* or above it see QEMU's drain of *node*."""
    for job in state.ctx.daemon.jobs.jobs.values():
        if isinstance(job, BackupJob) and job not in state.new_jobs and node in _job_nodes(job):
            job.drain_blip()


def _job_nodes(job: BackupJob) -> set[BlockNode]:
    """Nodes whose drain pauses *job*: its source and target and everything below them."""
    return {job.source, job.target} | _all_descendants(job.source) | _all_descendants(job.target)


class BlockdevBackupAction(Action):
    supports_grouped = True
    job: BackupJob | None = None
    source: BlockNode | None = None

    async def prepare(self) -> None:
        await super().prepare()
        graph = self.graph
        args = self.data
        source = graph.lookup(args.device, args.device)
        target = graph.lookup(args.target, args.target)
        await self._create(source, target, owns_target=False)

    async def _create(self, source: BlockNode, target: BlockNode, *, owns_target: bool) -> None:
        _drain_node_blips(self.state, source)
        self.state.drain_begin(source)
        self.source = source
        params = BackupParams.from_args(self.data)
        self.job = create_backup_job(
            self.state.ctx.daemon.jobs,
            self.graph,
            source,
            target,
            params,
            self.state.job_txn,
            owns_target=owns_target,
        )
        self.state.new_jobs.append(self.job)

    def commit(self) -> None:
        if self.job is not None:
            self.job.start_drained()

    async def abort(self) -> None:
        job = self.job
        if job is not None and job.status == S.CREATED:
            await job.user_cancel(force=True)

    async def clean(self) -> None:
        if self.source is not None:
            self.state.drain_end(self.source)


class DriveBackupAction(BlockdevBackupAction):
    """drive-backup: create (or open) the target image, then back up into it. The target node
    belongs to the job and is closed with it. ``device`` may name any node."""

    target_node: BlockNode | None = None

    async def prepare(self) -> None:
        await Action.prepare(self)
        args = self.data
        graph = self.graph
        source = graph.lookup(args.device, args.device)
        existing = args.mode is not None and args.mode.value == "existing"
        fmt = args.format if args.format is not None else None if existing else source.drv
        backing: BlockNode | None = None
        if args.sync.value == "top":
            backing = _cow_backing(source)
            if backing is None:
                self.data = args.model_copy(update={"sync": MirrorSyncMode.FULL})
        elif args.sync.value == "none":
            backing = source
        from blockd.qmp.commands.mirror import nbd_target_options

        proto = nbd_target_options(args.target) or {"driver": "file", "filename": args.target}
        if not existing:
            assert fmt is not None
            nbd = proto if proto["driver"] == "nbd" else None
            await _create_image(graph, args.target, fmt, source.length, backing, nbd)
        if fmt is None:
            fmt = await probe_format(graph, proto)
        opts: dict[str, Any] = {"driver": fmt, "discard": "unmap", "detect-zeroes": "unmap"}
        if fmt in ("file", "nbd"):
            opts.update(proto)
        else:
            opts["file"] = proto
        if args.sync.value == "none" and fmt != "file" and fmt != "raw":
            opts["backing"] = source.node_name
        if driver_class(fmt) is None:
            raise QmpError(f"Unknown driver '{fmt}'")
        from blockd.qapi.block import BlockdevOptions

        node = await graph.open_node(ArgsValidator(BlockdevOptions).validate(opts))
        self.target_node = node
        await self._create(source, node, owns_target=True)

    async def abort(self) -> None:
        await super().abort()
        node = self.target_node
        if node is not None and (self.job is None or self.job.status == S.NULL):
            await self.graph.maybe_free(node)


def _cow_backing(node: BlockNode) -> BlockNode | None:
    """The first backing node below *node*, skipping filters (bdrv_cow_bs(skip_filters))."""
    cur: BlockNode | None = node
    while cur is not None and cur.driver.is_filter:
        cur = cur.filtered_child()
    return cur.backing if cur is not None else None


async def _create_image(
    graph: Any,
    path: str,
    fmt: str,
    size: int,
    backing: BlockNode | None,
    proto: dict[str, Any] | None = None,
) -> None:
    """Create the drive-backup/drive-mirror target as QEMU's bdrv_img_create would. *proto*:
    the protocol options of a target that cannot be created (an NBD export): as in QEMU it
    must open, and the format is written into it."""
    from blockd.qapi.block import BlockdevCreateOptions, BlockdevOptions

    cls = driver_class(fmt)
    if cls is None or not (cls.is_format or fmt == "file"):
        raise QmpError(f"Unknown file format '{fmt}'")
    if backing is not None and not cls.supports_backing:
        raise QmpError(f"Backing file not supported for file format '{fmt}'")
    validate = ArgsValidator(BlockdevCreateOptions).validate
    file_node: BlockNode | None = None
    if proto is not None:
        try:
            file_node = await graph.open_node(ArgsValidator(BlockdevOptions).validate(proto))
        except QmpError as exc:
            raise QmpError(
                f"Protocol driver '{proto['driver']}' does not support image creation, and "
                f"opening the image failed: {exc.desc}"
            ) from None
    else:
        file_cls = driver_class("file")
        assert file_cls is not None
        file_size = size if fmt in ("raw", "file") else 0
        await file_cls.create(
            validate({"driver": "file", "filename": path, "size": file_size}), graph
        )
    try:
        if fmt in ("raw", "file"):
            return
        if not cls.can_create:
            raise QmpError(f"Unknown file format '{fmt}'")
        if file_node is None:
            file_node = await graph.open_node(
                ArgsValidator(BlockdevOptions).validate({"driver": "file", "filename": path})
            )
        opts: dict[str, Any] = {"driver": fmt, "file": file_node.node_name, "size": size}
        if backing is not None:
            opts["backing-file"] = backing.filename
            opts["backing-fmt"] = backing.drv
        await cls.create(validate(opts), graph)
    finally:
        if file_node is not None:
            await graph.maybe_free(file_node)


class SnapshotAction(Action):
    """blockdev-snapshot(-sync): as in QEMU the overlay is installed in prepare, so later
    actions of the same transaction see it; abort puts the old node back."""

    snap: ExternalSnapshot | None = None

    async def prepare(self) -> None:
        await super().prepare()
        if self.kind == "blockdev-snapshot":
            self.snap = ExternalSnapshot(self.graph)
            self.snap.prepare_existing(self.data.node, self.data.overlay)
        else:
            self.snap = await snapshot_sync(self.state.ctx, self.data)
        await self.snap.commit()

    async def abort(self) -> None:
        if self.snap is not None:
            await self.snap.revert()


ACTION_OPS: dict[str, type[Action]] = {
    "abort": AbortAction,
    "block-dirty-bitmap-add": BitmapAddAction,
    "block-dirty-bitmap-remove": BitmapRemoveAction,
    "block-dirty-bitmap-clear": BitmapClearAction,
    "block-dirty-bitmap-enable": BitmapEnableAction,
    "block-dirty-bitmap-disable": BitmapDisableAction,
    "block-dirty-bitmap-merge": BitmapMergeAction,
    "blockdev-backup": BlockdevBackupAction,
    "blockdev-snapshot": SnapshotAction,
    "blockdev-snapshot-sync": SnapshotAction,
    "drive-backup": DriveBackupAction,
}


def drain_all_blip(ctx: Context) -> None:
    """QEMU's bdrv_drain_all() at the start of a transaction: every running block job shows
    ``paused`` (all of them), then ``running`` (all of them)."""
    running = [
        j
        for j in ctx.daemon.jobs.jobs.values()
        if isinstance(j, BlockJob) and j.status in (S.RUNNING, S.READY) and not j.paused
    ]
    for j in running:
        j._transition(S.STANDBY if j.status == S.READY else S.PAUSED)
    for j in running:
        j._transition(S.READY if j.status == S.STANDBY else S.RUNNING)


async def run_transaction(
    ctx: Context, actions: list[tuple[str, Any]], *, grouped: bool = False
) -> None:
    """Prepare every action in order, then commit all, or abort all on the first error."""
    drain_all_blip(ctx)
    state = TxnState(ctx, grouped, JobTxn() if grouped else None)
    prepared: list[Action] = []
    try:
        for kind, data in actions:
            op = ACTION_OPS[kind](state, kind, data)
            prepared.append(op)
            await op.prepare()
    except BaseException:
        for op in reversed(prepared):
            try:
                await op.abort()
            except Exception:
                log.exception("transaction: abort of %s failed", op.kind)
        for op in prepared:
            try:
                await op.clean()
            except Exception:
                log.exception("transaction: clean of %s failed", op.kind)
        raise
    for op in prepared:
        op.commit()
    for op in prepared:
        await op.clean()
    if state.new_jobs:
        # Let jobs with nothing to copy finish before the reply, as they do in QSD.
        await asyncio.sleep(0)


@command("transaction", TransactionArgs)
async def qmp_transaction(ctx: Context, args: TransactionArgs) -> None:
    props = args.properties
    grouped = (
        props is not None
        and props.completion_mode is not None
        and props.completion_mode == ActionCompletionMode.GROUPED
    )
    await run_transaction(ctx, [(a.type.value, a.data) for a in args.actions], grouped=grouped)


__all__ = ["ACTION_OPS", "Action", "run_transaction"]
