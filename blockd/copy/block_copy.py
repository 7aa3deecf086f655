"""The block-copy engine (QEMU's block/block-copy.c): copies the dirty clusters of a copy
bitmap from a source node to a target node.

It is shared on purpose. A backup job runs :meth:`BlockCopy.run` in the background over the
whole disk while its copy-before-write hook calls :meth:`BlockCopy.copy` inline for each guest
write; both draw from the same bitmap and the same list of in-flight tasks, so a cluster is
copied exactly once, and the old data of a cluster always reaches the target before a guest
write may change it. Mirror, stream and commit can reuse the same engine with their own bitmaps.

Rules, as in QEMU:

* A task claims a run of dirty clusters by **clearing their bits first** and registering itself
  as in flight; if it fails it sets the bits again, so nothing is lost and a later call retries.
* A caller that meets a range already in flight **waits** for that task and then looks at the
  bitmap again ("if it succeeds it helps us, if it fails we retry").
* Block status decides the method per task: zero ranges become ``write_zeroes(MAY_UNMAP)`` on
  the target (keeps qcow2 targets sparse), unallocated ranges are skipped when
  ``skip_unallocated`` is set (sync=top), everything else is read and written.
* Data moves in merged chunks of at least 1 MiB with several tasks in flight; zero ranges are
  written in much larger pieces because they cost no buffer.

Reads of the source bypass the source node's own request tracking: the copy-before-write hook
runs *inside* a guest write request on that node, and a serialising request (write-zeroes,
unaligned write) would otherwise wait for itself. Correctness comes from the cluster bookkeeping
here instead: a cluster is only read while no write to it can pass the hook.

Mirror and commit use the same engine with a **live** bitmap: guest writes set bits again while
the job runs (:meth:`BlockCopy.mark_dirty`). Two extra rules make that safe: a claim never
overlaps a task still in flight (a cluster dirtied again while it is being copied waits until
that copy is done, so writes reach the target in order), and writes the guest sends straight to
the target (mirror's write-blocking mode) register as in-flight ranges too
(:meth:`BlockCopy.active_write`). ``max_bytes_in_flight`` bounds the data buffers in use
(mirror's buf-size).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from blockd.bitmap.hbitmap import HBitmap
from blockd.block.driver import WriteFlags
from blockd.block.status import BlockStatus

if TYPE_CHECKING:
    from blockd.block.node import BlockNode

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Smallest copy granule (BLOCK_COPY_CLUSTER_SIZE_DEFAULT).
MIN_CLUSTER = 64 * KiB
#: Bytes per data task when no speed limit applies: big enough to amortise the thread-pool hop.
DEFAULT_CHUNK = 4 * MiB
#: Bytes per data task under a speed limit (QEMU's 1 MiB BLOCK_COPY_MAX_BUFFER), so progress
#: and throttling move in the same steps as qemu-storage-daemon's.
LIMITED_CHUNK = 1 * MiB
#: Bytes per write-zeroes task: no buffer is involved.
ZERO_CHUNK = 1 * GiB
#: Tasks in flight per background call unless x-perf says otherwise.
DEFAULT_WORKERS = 8
#: Copy-before-write for a writer going sequentially (its request starts at, or less than
#: this after, the end of a recent copy-before-write task) copies up to this much of the
#: dirty run ahead of it in one task, so the writes that follow find their clusters copied
#: instead of each paying a read and a write of one cluster.
SEQUENTIAL_AHEAD = 1 * MiB
#: Ends of this many recent copy-before-write tasks are remembered to recognise those writers.
SEQUENTIAL_STREAMS = 8


def cluster_size_for(target: BlockNode) -> int:
    """The copy granule: at least 64 KiB, at least the target's cluster (QEMU's
    block_copy_calculate_cluster_size), so a copied cluster never half-fills a target cluster."""
    cluster = target.driver.info_cluster_size()
    if cluster is not None and cluster > MIN_CLUSTER:
        return cluster
    return MIN_CLUSTER


class BlockCopyError(Exception):
    """A task failed; *is_read* tells whether reading the source or writing the target did."""

    def __init__(self, err: int, is_read: bool) -> None:
        super().__init__(err, "read" if is_read else "write")
        self.errno = err
        self.is_read = is_read


class Pacer(Protocol):
    """What a background call needs from its job (:class:`~blockd.job.blockjob.BlockJob`):
    a speed limit that is also a pause point. ``pace()`` waits while the bytes counted so far
    are ahead of the limit (looking again after each wait); tasks are counted through
    ``BlockCopy.on_task``."""

    def rate_limited(self) -> bool: ...

    async def pace(self) -> None: ...


@dataclass(eq=False)
class _Task:
    start: int
    end: int
    zero: bool
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class BlockCopy:
    """Copy state for one (source, target) pair (QEMU's BlockCopyState).

    The nodes are not owned: the caller holds them with suitable permissions and keeps them
    open while the engine is used.

    **Runs in:** the event loop. **Concurrency:** any number of :meth:`copy` and :meth:`run`
    calls may overlap; they coordinate through ``copy_bitmap`` and the in-flight list, which are
    only changed between awaits.
    """

    def __init__(
        self,
        source: BlockNode,
        target: BlockNode,
        *,
        cluster_size: int | None = None,
        skip_unallocated: bool = False,
        max_chunk: int = 0,
        write_flags: WriteFlags = WriteFlags.NONE,
        on_progress: Callable[[int], None] | None = None,
        on_skip: Callable[[int], None] | None = None,
        on_task: Callable[[int], None] | None = None,
        status_base: BlockNode | None = None,
        zero_flags: WriteFlags = WriteFlags.MAY_UNMAP,
        max_bytes_in_flight: int = 0,
        count_zero_tasks: bool = True,
    ) -> None:
        # -- immutable after init
        self.source = source
        self.target = target
        self.cluster_size = cluster_size or cluster_size_for(target)
        self.len = source.length
        self.max_chunk = max_chunk
        self.write_flags = write_flags
        self.on_progress = on_progress or (lambda n: None)
        self.on_skip = on_skip or (lambda n: None)
        #: Told the size of every task as it starts, background and copy-before-write alike:
        #: a speed limit counts them all (copy-before-write is never held back, so the
        #: background copy waits for it instead), as QEMU's block-copy does.
        self.on_task = on_task or (lambda n: None)
        #: With skip_unallocated: what lies at or below this node is not copied (commit's
        #: base); None: only the source's own layer counts (backup sync=top).
        self.status_base = status_base
        #: Flags of the target writes that copy zero ranges (mirror's unmap=false drops
        #: MAY_UNMAP).
        self.zero_flags = zero_flags
        #: Bound on the bytes of data tasks in flight (0: none); zero tasks use no buffer.
        self.max_bytes_in_flight = max_bytes_in_flight
        #: Whether zero tasks count against a speed limit (mirror does not count them).
        self.count_zero_tasks = count_zero_tasks
        #: Called after bits were set by :meth:`mark_dirty` (wakes a waiting job).
        self.on_dirty: Callable[[], None] = lambda: None
        # -- changes while running (event loop only)
        self.skip_unallocated = skip_unallocated
        #: Bits still to copy.
        self.copy_bitmap = HBitmap(self.len, self.cluster_size)
        self._inflight: list[_Task] = []
        #: Where recent copy-before-write tasks ended (sequential writers start there next).
        self._cbw_ends: deque[int] = deque(maxlen=SEQUENTIAL_STREAMS)

    # -- helpers ---------------------------------------------------------------------------
    def _align(self, offset: int, nbytes: int) -> tuple[int, int]:
        cs = self.cluster_size
        start = offset - offset % cs
        end = min(-(-(offset + nbytes) // cs) * cs, self.len)
        return start, end

    def _chunk(self, limited: bool) -> int:
        chunk = LIMITED_CHUNK if limited else DEFAULT_CHUNK
        if self.max_chunk:
            chunk = min(chunk, self.max_chunk)
        return max(chunk - chunk % self.cluster_size, self.cluster_size)

    def _overlapping(self, start: int, end: int) -> _Task | None:
        for t in self._inflight:
            if t.start < end and start < t.end:
                return t
        return None

    async def _status(self, offset: int, nbytes: int) -> tuple[str, int]:
        """("skip" | "zero" | "data", length) for the range from *offset*, length rounded to
        whole clusters (a sub-cluster answer is treated as data, as QEMU does)."""
        cs = self.cluster_size
        try:
            kind, length = await self._classify(offset, nbytes)
        except OSError:
            return "data", min(nbytes, cs)
        if length <= 0:
            return "data", min(nbytes, cs)
        if offset + length < self.len:
            length -= (offset + length) % cs
            if length < cs:
                return "data", min(nbytes, cs)
        return kind, min(length, nbytes)

    async def _classify(self, offset: int, nbytes: int) -> tuple[str, int]:
        """What the source holds from *offset*, for how long: ``skip``, ``zero`` or
        ``data``. A subclass with another notion of what to copy (stream: what lies between
        a node and its base) overrides this. **Raises** OSError."""
        if self.skip_unallocated and self.status_base is not None:
            ext = await self.source.block_status_above(offset, nbytes, self.status_base)
        elif self.skip_unallocated:
            # The top layer alone: where it allocates, the whole chain's answer is its
            # answer (block_status_above would only ask it again).
            ext = await self.source.block_status(offset, nbytes)
        else:
            ext = await self.source.block_status_above(offset, nbytes, None)
        if self.skip_unallocated and not ext.flags & (BlockStatus.ALLOCATED | BlockStatus.EOF):
            return "skip", ext.length
        return ("zero" if ext.flags & BlockStatus.ZERO else "data"), ext.length

    async def _claim(
        self, start: int, end: int, limited: bool, room: int = 0
    ) -> tuple[_Task] | _Task | bool | None:
        """Claim the next dirty run in ``[start, end)`` as a task.

        Returns the task, a one-tuple with a task in flight over the run's start (wait for
        it, then try again), True when a run was skipped as unallocated (bits cleared,
        progress total reduced) or changed meanwhile, or None when nothing in the range is
        dirty right now.
        """
        bm = self.copy_bitmap
        area = bm.next_dirty_area(start, end)
        if area is None:
            return None
        pos, n = area
        # A run never reaches into a task still in flight (a live bitmap dirties clusters
        # being copied again): it stops before it.
        for t in self._inflight:
            if t.start < pos + n and pos < t.end:
                if t.start <= pos:
                    return (t,)
                n = t.start - pos
        kind, slen = await self._status(pos, n)
        # Re-check after the await: another caller may have claimed some clusters meanwhile.
        if not bm.get(pos) or self._overlapping(pos, pos + min(slen, n)) is not None:
            return True
        slen = min(slen, n)
        lim = slen if kind != "data" else min(slen, self._chunk(limited))
        if kind == "data" and room:
            # what is left of the buffer budget, in whole clusters (at least one)
            lim = min(lim, max(room - room % self.cluster_size, self.cluster_size))
        if kind == "zero":
            # under a speed limit zero ranges move in the same steps as data
            lim = min(lim, self._chunk(True) if limited else ZERO_CHUNK)
        stop = bm.next_clear(pos, pos + lim)
        stop = pos + lim if stop < 0 else stop
        if kind == "skip":
            bm.reset(pos, stop - pos)
            self.on_skip(stop - pos)
            return True
        return self._start_task(pos, stop, kind == "zero")

    async def _read_source(self, offset: int, nbytes: int) -> bytes | bytearray | memoryview:
        node = self.source
        align = node.driver.limits.request_alignment
        if offset + nbytes > node.length or (align > 1 and (offset % align or nbytes % align)):
            return await node.read(offset, nbytes)  # odd tail: the checked path
        return await node.read_untracked(offset, nbytes)

    def _start_task(self, start: int, end: int, zero: bool) -> _Task:
        """Claim ``[start, end)``: clear its bits and register it as in flight."""
        self.copy_bitmap.reset(start, end - start)
        task = _Task(start, end, zero)
        self._inflight.append(task)
        return task

    def _end_task(self, task: _Task) -> None:
        self._inflight.remove(task)
        task.done.set()

    async def _copy_range(self, offset: int, nbytes: int, zero: bool) -> None:
        """Copy one range as zeroes or as data and count it as progress.

        :raise BlockCopyError: the read or the write failed (bits are the caller's business).
        """
        is_read = False
        try:
            if zero:
                await self.target.write_zeroes(offset, nbytes, self.zero_flags)
            else:
                is_read = True
                data = await self._read_source(offset, nbytes)
                is_read = False
                await self.target.write(offset, data, self.write_flags)
        except OSError as exc:
            log.debug("block-copy %s+%s failed (%s): %s", offset, nbytes, is_read, exc)
            raise BlockCopyError(exc.errno or errno.EIO, is_read) from exc
        self.on_progress(nbytes)

    async def _run_task(self, task: _Task) -> None:
        """Copy one claimed task; on failure give its clusters back to the bitmap."""
        try:
            await self._copy_range(task.start, task.nbytes, task.zero)
        except BaseException:
            self.copy_bitmap.set(task.start, task.nbytes)
            raise
        finally:
            self._end_task(task)

    async def _run_claimed(self, task: _Task) -> None:
        """Copy a copy-before-write task. Its clusters were claimed before block status was
        asked, so it goes through them run by run: unallocated runs are skipped (sync=top),
        zero runs written as zeroes, data read and written in chunks. On failure the clusters
        not copied yet are dirty again."""
        pos = task.start
        chunk = self._chunk(False)
        try:
            while pos < task.end:
                kind, n = await self._status(pos, task.end - pos)
                if kind == "skip":
                    self.on_skip(n)
                else:
                    if kind == "data":
                        n = min(n, chunk)
                    self.on_task(n)
                    await self._copy_range(pos, n, kind == "zero")
                pos += n
        except BaseException:
            self.copy_bitmap.set(pos, task.end - pos)
            raise
        finally:
            self._end_task(task)

    # -- the two kinds of calls ------------------------------------------------------------
    async def copy(self, offset: int, nbytes: int) -> None:
        """Make sure every cluster touched by ``[offset, offset+nbytes)`` has reached the
        target (copy-before-write). Waits for tasks already copying those clusters.

        The dirty clusters are claimed before the first await, so writers that arrive one
        after the other claim in that order and a later writer finds the clusters of an
        earlier one in flight at once. A writer that starts at or shortly after the end of a
        recent copy-before-write task (within SEQUENTIAL_AHEAD: clients reorder requests in
        flight a little) is taken as sequential: its claim goes on over the dirty run ahead
        of it (up to SEQUENTIAL_AHEAD), which its next writes then find copied.

        :raise BlockCopyError: when a copy this call made failed (the write must fail too).
        """
        start, end = self._align(offset, nbytes)
        bm = self.copy_bitmap
        back = ahead_to = -1
        for e in self._cbw_ends:
            if e <= start < e + SEQUENTIAL_AHEAD:
                back, ahead_to = e, min(start + SEQUENTIAL_AHEAD, self.len)
                break
        while start < end:
            busy = self._overlapping(start, end)
            if busy is not None:
                await busy.done.wait()
                continue
            area = bm.next_dirty_area(start, end, ZERO_CHUNK)
            if area is None:
                return
            pos, n = area
            own = True
            if back >= 0:
                # a sequential writer: the dirty run ahead, and the one just behind it back
                # to where the last task ended (requests of the writer still on their way)
                if ahead_to > pos + n and pos + n == end:
                    more = bm.next_dirty_area(pos, ahead_to)
                    if more is not None and more[0] == pos:
                        n = more[1]
                lo = back
                while (clear := bm.next_clear(lo, pos)) >= 0:
                    lo = clear + self.cluster_size
                n += pos - lo
                pos = lo
                back = -1
                own = start <= pos and pos + n <= end
            task = self._start_task(pos, pos + n, False)
            self._cbw_ends.append(task.end)
            try:
                await self._run_claimed(task)
            except BlockCopyError:
                if own:
                    raise
                # The failure may lie in clusters this write does not touch, which must not
                # fail it: what was not copied is dirty again, so go on with a claim of this
                # write's own clusters only; an error there is raised by that one.

    async def run(
        self,
        offset: int,
        nbytes: int,
        *,
        max_workers: int = DEFAULT_WORKERS,
        pacer: Pacer,
        one_pass: bool = False,
    ) -> None:
        """Copy everything dirty in the range with up to *max_workers* tasks in flight.
        With *one_pass*, go through the range once and return even if clusters behind the
        current position were dirtied again meanwhile (a mirror under a guest that never
        pauses would otherwise never get out of here).

        The pacer is consulted before each task (speed limit, pause point; a cancelled job
        raises from it). After the first failure no new task starts; the call then waits for
        the tasks in flight and raises.

        :raise BlockCopyError: the first failure; its clusters are dirty again.
        """
        end = min(offset + nbytes, self.len)
        tasks: set[asyncio.Task[None]] = set()
        failure: BlockCopyError | None = None
        pos = offset
        behind = self.target.start_write_behind()

        def reap(done: set[asyncio.Task[None]]) -> None:
            nonlocal failure
            for t in done:
                tasks.discard(t)
                if t.cancelled():
                    continue
                exc = t.exception()
                if exc is not None and failure is None:
                    failure = (
                        exc if isinstance(exc, BlockCopyError) else BlockCopyError(errno.EIO, False)
                    )

        try:
            while failure is None:
                if tasks and len(tasks) >= max_workers:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    reap(done)
                    continue
                peek = self.copy_bitmap.next_dirty_area(pos, end)
                if peek is None:
                    if tasks:
                        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                        reap(done)
                        continue
                    if not one_pass and self.copy_bitmap.next_dirty(offset, end) >= 0:
                        pos = offset  # bits given back by a failed copy-before-write
                        continue
                    other = self._overlapping(offset, end)
                    if other is None:
                        return
                    await other.done.wait()  # a copy-before-write task: it may fail
                    continue
                budget = self.max_bytes_in_flight
                room = budget - self._data_bytes() if budget else 0
                if budget and tasks and room < self.cluster_size:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    reap(done)
                    continue
                limited = pacer.rate_limited()
                await pacer.pace()  # what was copied so far must be within the limit
                got = await self._claim(peek[0], end, limited, max(room, 0))
                if isinstance(got, _Task):
                    if not got.zero or self.count_zero_tasks:
                        self.on_task(got.nbytes)
                    tasks.add(asyncio.create_task(self._run_task(got)))
                    pos = got.end
                elif isinstance(got, tuple):
                    await got[0].done.wait()  # copied again once that copy is done
                elif got is True:
                    continue
                else:
                    pos = end if one_pass else offset
        except asyncio.CancelledError:
            # The job's task itself was interrupted (shutdown stopped waiting for it): the
            # requests in flight may hang on a server that stopped answering; abandon them.
            for t in tasks:
                t.cancel()
            raise
        finally:
            if tasks:
                done, _ = await asyncio.wait(tasks)
                reap(done)
            for drv in behind:
                drv.set_write_behind(False)
        if failure is not None:
            raise failure

    def _data_bytes(self) -> int:
        return sum(t.nbytes for t in self._inflight if not t.zero)

    # -- the live feed of mirror and active commit ------------------------------------------
    def mark_dirty(self, offset: int, nbytes: int) -> None:
        """Guest data in the range changed after it may have been copied: copy it (again)."""
        self.copy_bitmap.set(offset, nbytes)
        self.on_dirty()

    def dirty_bytes(self) -> int:
        return self.copy_bitmap.count()

    def bytes_in_flight(self) -> int:
        return sum(t.nbytes for t in self._inflight)

    @contextlib.asynccontextmanager
    async def active_write(self, offset: int, nbytes: int) -> AsyncIterator[None]:
        """A guest write that goes to the target itself (mirror copy-mode=write-blocking):
        it waits until no copy overlaps its range, and holds the range in flight meanwhile
        so that no copy starts under it; the data it writes reaches the target in order."""
        start, end = self._align(offset, nbytes)
        while (busy := self._overlapping(start, end)) is not None:
            await busy.done.wait()
        task = _Task(start, end, False)
        self._inflight.append(task)
        try:
            yield
        finally:
            self._end_task(task)

    async def reset_unallocated(self, pacer: Pacer) -> None:
        """sync=top: clear every cluster the source's top layer does not allocate, up front,
        so the job's length is right early (QEMU's block_copy_reset_unallocated loop)."""
        pos = 0
        while pos < self.len:
            await pacer.pace()
            n = min(self.len - pos, ZERO_CHUNK)
            try:
                ext = await self.source.block_status(pos, n)
            except OSError:
                return
            length = max(ext.length, 1)
            start, stop = pos, pos + length
            if not ext.flags & BlockStatus.ALLOCATED:
                cs = self.cluster_size
                a = -(-start // cs) * cs
                b = stop if stop >= self.len else stop - stop % cs
                if b > a:
                    cleared = sum(n for _, n in self.copy_bitmap.dirty_areas(a, b))
                    self.copy_bitmap.reset(a, b - a)
                    if cleared:
                        self.on_skip(cleared)
            pos = stop
