"""A node of the block graph and its request path (QEMU's BlockDriverState and block/io.c).

Every read and write of every user, be it an NBD client, a job or another node, passes
through :class:`BlockNode`. That is where requests are bounds-checked, aligned, ordered
against overlapping writes, offered to copy-before-write hooks and recorded in dirty bitmaps,
so none of those rules can be bypassed by a driver or a caller.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from blockd.block.driver import BlockDriver, WriteFlags
from blockd.block.perm import (
    ChildRole,
    Perm,
    PermUpdate,
    cumulative,
    perm_update,
    refresh,
    release_perms,
)
from blockd.block.status import BlockStatus, Extent

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph

log = logging.getLogger(__name__)

_ZERO = bytes(1024 * 1024)
#: Largest piece a copy-on-read request reads and writes at once (bounds its buffer).
_COR_PIECE = 4 * 1024 * 1024

#: Set while a task works inside the graph: a node's driver calling its children, or the
#: code that holds a drained section. Such requests pass quiesced nodes (QEMU stops only
#: the external sources of requests, BlockBackends and jobs, during a drain); a request that
#: enters the graph from outside (an export, a job's copy loop) waits at a quiesced node.
_INSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("blockd_inside", default=False)


def inside_graph() -> contextvars.Token[bool]:
    """Mark the current task as working inside the graph (see :data:`_INSIDE`)."""
    return _INSIDE.set(True)


def leave_graph(token: contextvars.Token[bool]) -> None:
    _INSIDE.reset(token)


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True when *data* holds only zero bytes (compared in 1 MiB slices, in C)."""
    mv = memoryview(data).cast("B")
    for pos in range(0, len(mv), len(_ZERO)):
        part = mv[pos : pos + len(_ZERO)]
        if part != _ZERO[: len(part)]:
            return False
    return True


class DirtyTracker(Protocol):
    """What the request path needs of a dirty bitmap."""

    def is_recording(self) -> bool: ...

    def set_range(self, offset: int, nbytes: int) -> None: ...

    def resize(self, size: int) -> None: ...


#: A hook run before a write reaches the driver: ``await hook(node, offset, nbytes)``.
#: Copy-before-write uses it to save old data first. Raising fails the write.
WriteHook = Callable[["BlockNode", int, int], Awaitable[None]]


class Parent(Protocol):
    """Anything that can hold a child edge: a node or a :class:`BlockUser`."""

    def parent_desc(self) -> str:
        """How permission conflicts name this parent (QEMU's get_parent_desc)."""
        ...


@dataclass(eq=False)
class BdrvChild:
    """An edge from a parent to *node* (QEMU's BdrvChild)."""

    name: str
    role: ChildRole
    parent: Parent
    node: BlockNode
    perm: Perm = Perm.CONSISTENT_READ
    shared: Perm = field(default_factory=Perm.all)
    #: The parent created the child from inline options and frees it when the edge goes;
    #: a child given by name belongs to whoever opened it (the monitor, a job, a command).
    owned: bool = False
    #: A job works on this edge (stream, commit): nothing may detach or replace it.
    frozen: bool = False
    #: The parent is a BlockBackend (an export, a job's main node), not a job's extra node
    #: (QEMU's child_root versus child_job): ``blockdev-del`` words its refusal differently.
    backend: bool = False


class BlockUser:
    """A parent that is not a node: an export, a job, a monitor reference (QEMU BlockBackend).

    *desc* is how permission conflicts name it: QEMU says "an unnamed block device" for an
    export's BlockBackend and "backup job 'j'" for a job.
    """

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.edges: list[BdrvChild] = []

    def parent_desc(self) -> str:
        return self.desc

    def on_node_replaced(self, edge: BdrvChild, old: BlockNode, new: BlockNode) -> None:
        """*edge* now points to *new* (a snapshot or pivot moved this user)."""

    def attach(
        self,
        node: BlockNode,
        perm: Perm,
        shared: Perm,
        name: str = "root",
        update: PermUpdate | None = None,
        backend: bool = True,
    ) -> BdrvChild:
        """Become a parent of *node*; **raises** QmpError (and changes nothing) when the
        permissions conflict. *backend*: False for a job's extra nodes."""
        edge = BdrvChild(name, ChildRole.DATA, self, node, perm, shared, backend=backend)
        with perm_update(update) as upd:
            node.parents.append(edge)
            self.edges.append(edge)

            def undo() -> None:
                node.parents.remove(edge)
                self.edges.remove(edge)

            upd.undo.append(undo)
            refresh([node], upd)
        return edge

    def set_perm(self, edge: BdrvChild, perm: Perm, shared: Perm) -> None:
        """Change what this user needs and shares on *edge* (QEMU's blk_set_perm); all or
        nothing."""
        old = (edge.perm, edge.shared)
        with perm_update() as upd:
            edge.perm, edge.shared = perm, shared

            def undo() -> None:
                edge.perm, edge.shared = old

            upd.undo.append(undo)
            refresh([edge.node], upd)

    @staticmethod
    async def current_node(edge: BdrvChild) -> BlockNode:
        """The node a new request on *edge* goes to. While a graph change holds the node
        quiesced the request waits, then looks again: a pivot may have moved the edge, and
        the request belongs to the node the user is on afterwards (QEMU's BlockBackend
        queues requests during a drain for the same reason)."""
        node = edge.node
        while node.quiesce and not _INSIDE.get():
            await node.wait_unquiesced()
            node = edge.node
        return node

    def adopt(self, edge: BdrvChild) -> None:
        """Take over *edge* from another user (an export built after its node was taken)."""
        old = edge.parent
        if isinstance(old, BlockUser) and edge in old.edges:
            old.edges.remove(edge)
        edge.parent = self
        self.edges.append(edge)

    async def detach_all(self) -> None:
        for edge in list(self.edges):
            await self.detach(edge)

    def detach_sync(self, edge: BdrvChild) -> BlockNode | None:
        """Drop *edge* and give its permissions back; the node, if it may now be freed."""
        if edge in self.edges:
            self.edges.remove(edge)
        node = edge.node
        if edge not in node.parents:
            return None
        node.parents.remove(edge)
        release_perms(node)
        return node

    async def detach(self, edge: BdrvChild) -> None:
        node = self.detach_sync(edge)
        if node is not None:
            await node.graph.maybe_free(node)


@dataclass(eq=False)
class _Req:
    start: int
    end: int
    write: bool
    serialising: bool
    done: asyncio.Event = field(default_factory=asyncio.Event)
    token: contextvars.Token[bool] | None = None


class BlockNode:
    """One node: generic state and the request path around its driver."""

    def __init__(self, graph: BlockGraph, node_name: str, driver_cls: type[BlockDriver]) -> None:
        self.graph = graph
        self.node_name = node_name
        self.driver: BlockDriver = driver_cls(self)
        self.children: dict[str, BdrvChild] = {}
        self.parents: list[BdrvChild] = []
        self.monitor_owned = False
        self.implicit = False
        self.read_only = False
        self.auto_read_only = False
        self.force_share = False
        self.detect_zeroes = "off"
        self.discard_mode = "ignore"
        self.cache_direct = False
        self.cache_no_flush = False
        #: The options as given (wire form) for json:{...} filenames.
        self.options: dict[str, Any] = {}
        self.dirty_bitmaps: list[Any] = []
        self.before_write_hooks: list[WriteHook] = []
        #: Op blockers: owner -> reason ("block device is in use by block job: backup").
        self.blockers: dict[object, str] = {}
        self._reqs: list[_Req] = []
        #: Drained sections holding this node (graph.drained): new external requests wait.
        self.quiesce = 0
        self._unquiesced = asyncio.Event()
        self._unquiesced.set()
        self.closed = False
        self.write_threshold = 0

    # -- naming and structure ------------------------------------------------------------
    def __repr__(self) -> str:
        return f"<BlockNode {self.node_name} {self.driver.format_name}>"

    @property
    def drv(self) -> str:
        return self.driver.format_name

    @property
    def file(self) -> BlockNode | None:
        c = self.children.get("file") or self.children.get("image")
        return c.node if c else None

    @property
    def backing(self) -> BlockNode | None:
        c = self.children.get("backing")
        return c.node if c else None

    def filtered_child(self) -> BlockNode | None:
        """The node whose data this one shows unchanged (filters), if any."""
        if self.driver.is_filter:
            for c in self.children.values():
                if c.role & ChildRole.FILTERED:
                    return c.node
        return None

    def start_write_behind(self) -> list[BlockDriver]:
        """Tell every node this one writes its data into (itself, filtered and ``file``
        children, not backing images) that a job copies into it; returns their drivers, for
        the job to call ``set_write_behind(False)`` on when it stops, whatever the graph then
        looks like."""
        out: list[BlockDriver] = []
        stack: list[BlockNode] = [self]
        while stack:
            node = stack.pop()
            if any(d is node.driver for d in out):
                continue
            node.driver.set_write_behind(True)
            out.append(node.driver)
            for name, edge in node.children.items():
                if name != "backing" or node.driver.is_filter:
                    stack.append(edge.node)
        return out

    def skip_filters(self) -> BlockNode:
        """The first node at or below this one that is not a filter (bdrv_skip_filters)."""
        node: BlockNode = self
        while node.driver.is_filter:
            below = node.filtered_child()
            if below is None:
                break
            node = below
        return node

    def cow_backing(self) -> BlockNode | None:
        """The backing node whose data shows through this node's unallocated ranges, looking
        through filters on both sides."""
        back = self.skip_filters().backing
        return back.skip_filters() if back is not None else None

    def backing_chain(self) -> list[BlockNode]:
        """This node and its backing nodes, top first."""
        chain: list[BlockNode] = []
        cur: BlockNode | None = self
        while cur is not None and cur not in chain:
            chain.append(cur)
            cur = cur.backing
        return chain

    def json_filename(self) -> str:
        """QEMU's ``json:{...}`` pseudo filename built from the options."""
        opts = {k: v for k, v in self.options.items() if k != "node-name"}
        return "json:" + json.dumps(opts, separators=(", ", ": "))

    @property
    def filename(self) -> str:
        return self.driver.filename()

    # -- permissions and blockers --------------------------------------------------------
    def parent_desc(self) -> str:
        return f"node '{self.node_name}'"

    def cumulative_perms(self) -> tuple[Perm, Perm]:
        """What the parents need of this node together, and what they all share."""
        return cumulative(self)

    def writable(self) -> bool:
        """Whether writers may be attached (QEMU's bdrv_is_writable_after_reopen;
        ``auto-read-only`` nodes become writable on demand)."""
        return not self.read_only or self.auto_read_only

    def busy_reason(self) -> str | None:
        for reason in self.blockers.values():
            return reason
        return None

    def check_not_busy(self) -> None:
        from blockd.errors import QmpError

        reason = self.busy_reason()
        if reason:
            raise QmpError(f"Node '{self.node_name}' is busy: {reason}")

    def check_not_backing(self) -> None:
        """A backing file may be neither deleted nor replaced by a snapshot (QEMU's op
        blocker that the backing child sets on it)."""
        from blockd.errors import QmpError

        for edge in self.parents:
            if edge.name == "backing" and isinstance(edge.parent, BlockNode):
                raise QmpError(
                    f"Node '{self.node_name}' is busy: node is used as backing hd of "
                    f"'{edge.parent.node_name}'"
                )

    # -- request tracking ----------------------------------------------------------------
    async def _begin(self, start: int, end: int, write: bool, serialising: bool) -> _Req:
        """Register a request, then wait for the overlapping ones it must follow.

        Registration happens before the first await, so requests are ordered by arrival:
        a write follows every earlier overlapping write, and a serialising request (RMW,
        copy-before-write) excludes every overlapping request.
        """
        while self.quiesce and not _INSIDE.get():
            await self._unquiesced.wait()
        req = _Req(start, end, write, serialising)
        earlier = [
            r
            for r in self._reqs
            if r.start < end
            and start < r.end
            and (r.serialising or serialising or (write and r.write))
        ]
        self._reqs.append(req)
        # From here on, what this request asks of children is inside the graph.
        req.token = _INSIDE.set(True)
        for r in earlier:
            await r.done.wait()
        return req

    def _end(self, req: _Req) -> None:
        self._reqs.remove(req)
        req.done.set()
        if req.token is not None:
            _INSIDE.reset(req.token)

    @property
    def in_flight(self) -> int:
        return len(self._reqs)

    def in_flight_events(self) -> list[asyncio.Event]:
        """What to wait for so that every request in flight *now* has finished."""
        return [r.done for r in self._reqs]

    async def drain(self) -> None:
        """Wait until every request that is in flight now has finished; requests that
        arrive meanwhile are not waited for (a steady writer cannot starve the caller)."""
        for done in self.in_flight_events():
            await done.wait()

    async def wait_unquiesced(self) -> None:
        """Until no drained section holds this node (users that are not nodes call this
        before they pick the node for a request: see :meth:`BlockUser.current_node`)."""
        while self.quiesce and not _INSIDE.get():
            await self._unquiesced.wait()

    def begin_quiesce(self) -> None:
        self.quiesce += 1
        self._unquiesced.clear()

    def end_quiesce(self) -> None:
        self.quiesce -= 1
        if not self.quiesce:
            self._unquiesced.set()

    # -- the request path ----------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.driver.getlength()

    def _check(self, offset: int, nbytes: int) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.length:
            raise OSError(errno.EIO, f"request beyond end of {self.node_name}")

    def _check_write(self) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, f"node {self.node_name} is read-only")

    async def read(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        """Read *nbytes* at *offset*. **Raises** OSError with the driver's errno."""
        self._check(offset, nbytes)
        if nbytes == 0:
            return b""
        align = self.driver.limits.request_alignment
        if align > 1 and (offset % align or nbytes % align):
            a_start = offset - offset % align
            a_end = min(-(-(offset + nbytes) // align) * align, max(self.length, offset + nbytes))
            data = await self._read_aligned(a_start, a_end - a_start)
            return memoryview(data)[offset - a_start : offset - a_start + nbytes]
        return await self._read_aligned(offset, nbytes)

    async def _read_aligned(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        req = await self._begin(offset, offset + nbytes, False, False)
        try:
            return await self.read_untracked(offset, nbytes)
        finally:
            self._end(req)

    async def read_untracked(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        """An aligned read in ``max_transfer`` pieces that joins no request tracking: for
        copy-before-write, which runs inside a write on this very node and would otherwise
        wait for itself (block-copy guarantees nobody writes what it reads)."""
        maxt = self.driver.limits.max_transfer
        if not maxt or nbytes <= maxt:
            return await self.driver.preadv(offset, nbytes)
        out = bytearray(nbytes)
        for pos in range(0, nbytes, maxt):
            n = min(maxt, nbytes - pos)
            out[pos : pos + n] = await self.driver.preadv(offset + pos, n)
        return out

    async def copy_on_read(
        self, offset: int, nbytes: int, *, prefetch: bool = False, zero: bool = False
    ) -> bytes | bytearray | memoryview:
        """Read *nbytes* at *offset* and store what this node does not allocate itself (the
        backing chain's data) in this node (QEMU's BDRV_REQ_COPY_ON_READ, used by the stream
        job's copy-on-read filter).

        The whole range, widened to clusters, is one serialising request: overlapping guest
        writes wait for it and it waits for those in flight, and the allocation check is made
        inside it. So stale backing data can never overwrite a guest write, and a range a
        guest has written meanwhile is left alone. The copy is the same data the guest
        already reads, so it marks no dirty bitmap and passes no write hook (QEMU's
        BDRV_REQ_WRITE_UNCHANGED). *prefetch*: only populate, return nothing. *zero*: the
        caller knows the chain reads zeroes here, so nothing needs to be read.

        **Raises** OSError from the driver.
        """
        self._check(offset, nbytes)
        self._check_write()
        if nbytes == 0:
            return b""
        cs = max(self.driver.info_cluster_size() or 0, self.driver.limits.request_alignment)
        start = offset - offset % cs
        end = min(-(-(offset + nbytes) // cs) * cs, self.length)
        out = None if prefetch else bytearray(nbytes)
        req = await self._begin(start, end, False, True)
        try:
            pos = start
            while pos < end:
                ext = await self.block_status(pos, min(end - pos, _COR_PIECE))
                n = ext.length
                if ext.flags & BlockStatus.ALLOCATED:
                    if out is None:
                        pos += n
                        continue
                    data = await self.read_untracked(pos, n)
                else:
                    data = await self._populate(pos, n, zero, out is not None)
                if out is not None:
                    lo, hi = max(pos, offset), min(pos + n, offset + nbytes)
                    if lo < hi:
                        out[lo - offset : hi - offset] = memoryview(data)[lo - pos : hi - pos]
                pos += n
        finally:
            self._end(req)
        return b"" if out is None else out

    async def _populate(
        self, pos: int, n: int, zero: bool, want: bool
    ) -> bytes | bytearray | memoryview:
        """One unallocated piece of :meth:`copy_on_read`: read it through the backing chain
        and write it here, as zeroes when it reads as zeroes (keeps qcow2 overlays sparse).
        Returns the data when *want*."""
        if zero:
            await self.driver.pwrite_zeroes(pos, n, WriteFlags.NONE)
            return bytes(n) if want else b""
        data = await self.read_untracked(pos, n)
        if is_zero(data):
            await self.driver.pwrite_zeroes(pos, n, WriteFlags.NONE)
            return data
        mv = memoryview(data).cast("B")
        maxt = self.driver.limits.max_transfer or n
        for p in range(0, n, maxt):
            await self.driver.pwritev(pos + p, mv[p : p + maxt], WriteFlags.NONE)
        return data

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        """Write *data* at *offset* through hooks, the driver and the dirty bitmaps."""
        mv = memoryview(data).cast("B")
        nbytes = len(mv)
        self._check_write()
        self._check(offset, nbytes)
        if nbytes == 0:
            return
        if self.detect_zeroes != "off" and is_zero(mv):
            zflags = flags & WriteFlags.FUA
            if self.detect_zeroes == "unmap" and self.discard_mode == "unmap":
                zflags |= WriteFlags.MAY_UNMAP
            await self.write_zeroes(offset, nbytes, zflags)
            return
        compressed = bool(flags & WriteFlags.COMPRESSED)
        if compressed and not self.driver.supports_compressed_writes:
            raise OSError(errno.ENOTSUP, f"{self.drv}: compressed writes not supported")
        align = self.driver.limits.request_alignment
        unaligned = align > 1 and (offset % align or nbytes % align) and not compressed
        req = await self._begin(offset, offset + nbytes, True, bool(unaligned))
        try:
            await self._run_hooks(offset, nbytes)
            if compressed:
                # Whole clusters in one call, never split or padded: the driver checks the
                # cluster alignment itself (QEMU's bdrv_driver_pwritev_compressed).
                await self.driver.pwritev(offset, mv, flags)
            elif unaligned:
                await self._write_rmw(offset, mv, flags, align)
            else:
                maxt = self.driver.limits.max_transfer
                if not maxt or nbytes <= maxt:
                    await self.driver.pwritev(offset, mv, flags)
                else:
                    for pos in range(0, nbytes, maxt):
                        await self.driver.pwritev(offset + pos, mv[pos : pos + maxt], flags)
        finally:
            self._mark_dirty(offset, nbytes)
            self._end(req)

    async def _write_rmw(self, offset: int, mv: memoryview, flags: WriteFlags, align: int) -> None:
        a_start = offset - offset % align
        a_end = -(-(offset + len(mv)) // align) * align
        buf = bytearray(await self.driver.preadv(a_start, a_end - a_start))
        buf[offset - a_start : offset - a_start + len(mv)] = mv
        await self.driver.pwritev(a_start, memoryview(buf), flags)

    async def write_zeroes(
        self, offset: int, nbytes: int, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        self._check_write()
        self._check(offset, nbytes)
        if nbytes == 0:
            return
        if self.discard_mode != "unmap":
            flags &= ~WriteFlags.MAY_UNMAP
        req = await self._begin(offset, offset + nbytes, True, True)
        try:
            await self._run_hooks(offset, nbytes)
            await self.driver.pwrite_zeroes(offset, nbytes, flags)
        finally:
            self._mark_dirty(offset, nbytes)
            self._end(req)

    async def discard(self, offset: int, nbytes: int) -> None:
        self._check_write()
        self._check(offset, nbytes)
        if nbytes == 0 or self.discard_mode != "unmap":
            return
        req = await self._begin(offset, offset + nbytes, True, True)
        try:
            await self._run_hooks(offset, nbytes)
            await self.driver.pdiscard(offset, nbytes)
        finally:
            self._mark_dirty(offset, nbytes)
            self._end(req)

    async def flush(self) -> None:
        if self.cache_no_flush or self.closed:
            return
        await self.driver.flush()

    async def truncate(self, size: int, exact: bool = False, prealloc: str = "off") -> None:
        self._check_write()
        # Only the requests in flight here are waited for: formats grow their file from
        # inside a request, so a drained section (which waits for the parents too) would
        # wait for the caller itself. block_resize quiesces the graph around this call.
        await self.drain()
        await self.driver.truncate(size, exact, prealloc)
        # Bitmaps follow the new length here, not on every write, and a new tail starts
        # clean: it reads as zeroes, nothing there has changed (QEMU's
        # bdrv_dirty_bitmap_truncate; a truncate request sets no dirty bits).
        for bm in self.dirty_bitmaps:
            bm.resize(self.length)

    async def _run_hooks(self, offset: int, nbytes: int) -> None:
        for hook in list(self.before_write_hooks):
            await hook(self, offset, nbytes)

    def _mark_dirty(self, offset: int, nbytes: int) -> None:
        for bm in self.dirty_bitmaps:
            if bm.is_recording():
                bm.set_range(offset, nbytes)

    # -- allocation status ---------------------------------------------------------------
    async def block_status(self, offset: int, nbytes: int) -> Extent:
        """Status of this node alone from *offset* (the extent may be shorter than asked).

        Unallocated ranges with nothing below read as zeroes, so ZERO is added for them, as
        QEMU does.
        """
        length = self.length
        if offset >= length:
            return Extent(offset, 0, BlockStatus.EOF)
        nbytes = min(nbytes, length - offset)
        ext = await self.driver.block_status(offset, nbytes)
        if ext.length <= 0 or ext.offset != offset:
            raise OSError(errno.EIO, f"{self.drv}: bad block status at {offset}")
        if ext.end > offset + nbytes:
            ext.length = offset + nbytes - ext.offset
        if not ext.flags & BlockStatus.ALLOCATED and not ext.flags & BlockStatus.ZERO:
            back = self.cow_backing()
            if back is None or offset >= back.length:
                ext.flags |= BlockStatus.ZERO
            elif offset + ext.length > back.length:
                ext.length = back.length - offset
        return ext

    async def block_status_above(
        self, offset: int, nbytes: int, base: BlockNode | None = None
    ) -> Extent:
        """Status of the chain from this node down to (not including) *base*, looking
        through filters.

        ``ALLOCATED`` means some layer above *base* holds the range; ``depth`` tells which.
        """
        depth = 0
        if base is not None:
            base = base.skip_filters()
        # The top node is asked itself (a blkdebug filter injects block-status errors); below
        # it, filters are looked through.
        cur: BlockNode | None = self
        want = nbytes
        while cur is not None and cur is not base:
            ext = await cur.block_status(offset, want)
            if ext.flags & BlockStatus.EOF:
                return Extent(offset, 0, BlockStatus.EOF)
            back = cur.cow_backing()
            if ext.flags & BlockStatus.ALLOCATED or back is None or back is base:
                ext.depth = depth
                return ext
            if offset >= back.length:
                ext.flags |= BlockStatus.ZERO
                ext.depth = depth
                return ext
            want = ext.length
            cur = back
            depth += 1
        return Extent(offset, want, BlockStatus(0), depth=depth)

    async def is_allocated_above(
        self, offset: int, nbytes: int, base: BlockNode | None
    ) -> tuple[bool, int]:
        ext = await self.block_status_above(offset, nbytes, base)
        return bool(ext.flags & BlockStatus.ALLOCATED), max(ext.length, 0)

    # -- lifecycle ----------------------------------------------------------------------
    async def close(self) -> None:
        if self.closed:
            return
        await self.drain()
        try:
            if not self.read_only:
                await self.flush()
        finally:
            self.closed = True
            await self.driver.close()
