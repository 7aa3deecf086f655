"""One backup run: choose the level, start every disk in one transaction, follow the jobs,
close the targets, hash what was copied, and only then give the point its number.

The QMP flow is QEMU's docs/interop/bitmaps.rst:

- full: one ``transaction`` of ``block-dirty-bitmap-add`` (persistent; or ``-clear``, plus
  ``-enable`` if someone disabled it) and ``blockdev-backup sync=full`` per disk, so the
  bitmap starts at the instant the backup does. QEMU 7.2 refuses ``completion-mode=grouped``
  with bitmap actions, so these jobs complete individually and a failure of any disk fails
  the run here.
- incremental: one ``transaction`` of ``blockdev-backup sync=incremental`` per disk with
  ``completion-mode=grouped``: one disk failing cancels the others, and every bitmap keeps its
  bits.

Either way every disk's job starts in the same transaction, so the backups are one point in
time across disks. Jobs run with ``auto-dismiss=false`` and are followed by polling
``query-jobs`` in short sessions (a concluded job keeps its error until dismissed, so nothing
is missed between two sessions). A target counts as done only after ``blockdev-del`` (flush and
close) succeeded; then its chunks are hashed from the file, the manifest is written, and last
the directory state takes the point number.

The run marker in the directory state lists every file the run creates before it creates
any; a run that dies (kill -9, power loss) is cleaned up by the next one from that list.
Whatever the cause of a failure, the next ``auto`` run is a full one: a bitmap that lived
through a failed run is not trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from blockd.tools.backup import digest, lock
from blockd.tools.backup.errors import DaemonLost, DaemonUnreachable, QmpFailed, ToolError
from blockd.tools.backup.layers import hash_chunks, read_map
from blockd.tools.backup.manifest import (
    BackupDir,
    Chain,
    DiskPoint,
    Point,
    chain_dir_name,
    fsync_dir,
    fsync_file,
    layer_name,
    sums_name,
)
from blockd.tools.backup.progress import Reporter, human
from blockd.tools.backup.qemuimg import create_layer
from blockd.tools.backup.session import Monitor, Session

CLUSTER = 65536
POLL = 0.05
#: Bounds of the wait between two looks at running jobs (see :func:`next_poll`).
POLL_MIN, POLL_MAX = 0.01, 0.25


def next_poll(rate: float, remaining: int) -> float:
    """How long to wait before looking at the jobs again. Each look is a QMP connection of
    its own (qemu-storage-daemon's monitor takes one client at a time), which costs both
    processes CPU that the copy could use: so look rarely while much is left, and often when
    the jobs are about to end, so that the end is seen at once (half the expected time left,
    in bytes at the rate seen so far)."""
    if rate <= 0:
        return POLL
    return min(POLL_MAX, max(POLL_MIN, remaining / rate / 2))


@dataclass
class BackupOptions:
    socket: str
    nodes: list[str]
    dir: Path
    level: str = "auto"
    compress: bool = False
    speed: int = 0
    busy_timeout: float = 60.0


@dataclass
class Disk:
    node: str
    size: int
    bitmaps: dict[str, dict[str, Any]]


@dataclass
class Plan:
    level: str  # "full" or "inc"
    reason: str
    point: int
    chain_no: int
    chain: Chain | None  # the chain an incremental extends
    bitmap: str


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- looking at the daemon -----------------------------------------------------------------------
Leftovers = tuple[list[str], list[str]]  # job ids, target node names


async def look(s: Session, bdir: BackupDir, nodes: list[str]) -> tuple[dict[str, Disk], Leftovers]:
    """The disks, and what an interrupted run of this directory left in the daemon (its jobs
    and target nodes), in one session."""
    infos = await s.execute("query-named-block-nodes", {"flat": True})
    by_name = {n["node-name"]: n for n in infos}
    disks = {}
    for node in nodes:
        info = by_name.get(node)
        if info is None:
            raise ToolError(f"the daemon has no node '{node}'")
        bitmaps = {b["name"]: b for b in info.get("dirty-bitmaps", []) if "name" in b}
        disks[node] = Disk(node, int(info["image"]["virtual-size"]), bitmaps)
    prefix = bdir.prefix
    jobs = [j["id"] for j in await s.execute("query-jobs") if j["id"].startswith(prefix)]
    targets = [n for n in by_name if n.startswith(prefix + "t")]
    return disks, (jobs, targets)


async def cleanup_leftovers(mon: Monitor, jobs: list[str], nodes: list[str], rep: Reporter) -> None:
    """Cancel and dismiss *jobs*, delete *nodes*: what an interrupted run left behind."""
    if jobs or nodes:
        rep.note(f"removing what an interrupted run left in the daemon: {len(jobs)} job(s)")
    await finish_jobs(mon, jobs, cancel=True)
    await delete_nodes(mon, nodes)


async def finish_jobs(mon: Monitor, ids: list[str], cancel: bool, timeout: float = 60) -> None:
    """Cancel (if asked) and dismiss the jobs *ids*, waiting for them to conclude."""
    if not ids:
        return
    deadline = time.monotonic() + timeout
    pending = set(ids)
    while pending:
        async with mon.session() as s:
            present = {j["id"]: j for j in await s.execute("query-jobs")}
            for jid in list(pending):
                job = present.get(jid)
                if job is None:
                    pending.discard(jid)
                elif job["status"] == "concluded":
                    with contextlib.suppress(QmpFailed):
                        await s.execute("job-dismiss", {"id": jid})
                    pending.discard(jid)
                elif cancel and job["status"] not in ("aborting", "null"):
                    with contextlib.suppress(QmpFailed):
                        await s.execute("job-cancel", {"id": jid})
        if pending:
            if time.monotonic() > deadline:
                raise ToolError(f"jobs {', '.join(sorted(pending))} did not end in {timeout:g} s")
            await asyncio.sleep(POLL)


async def delete_nodes(mon: Monitor, nodes: list[str]) -> list[str]:
    """``blockdev-del`` each of *nodes* that exists; the ones that could not be deleted."""
    failed = []
    async with mon.session() as s:
        for node in nodes:
            try:
                await s.execute("blockdev-del", {"node-name": node})
            except QmpFailed as exc:
                if not exc.missing:
                    failed.append(f"{node} ({exc.desc})")
    return failed


# -- choosing the level --------------------------------------------------------------------------
def full_reason(bdir: BackupDir, disks: dict[str, Disk]) -> str | None:
    """Why this run cannot be an incremental, or None when it can."""
    chain = bdir.latest_chain()
    if chain is None:
        return f"no backup in {bdir.path} yet"
    if sorted(chain.disks) != sorted(disks):
        return f"the disks ({', '.join(disks)}) differ from the chain's ({', '.join(chain.disks)})"
    last = chain.points[-1]
    for name, disk in disks.items():
        was = last.disks[name].size
        if disk.size != was:
            return f"{name} changed size ({human(was)} -> {human(disk.size)})"
    failure = bdir.state.last_failure
    if failure is not None:
        return f"the previous run failed ({failure['reason']}); its bitmaps are not trusted"
    name = bdir.bitmap_name(chain.chain)
    for node, disk in disks.items():
        bm = disk.bitmaps.get(name)
        if bm is None:
            return f"bitmap {name} is missing on {node}"
        if bm.get("inconsistent"):
            return f"bitmap {name} on {node} is inconsistent (the daemon did not save it)"
        if not bm.get("recording", False):
            return f"bitmap {name} on {node} is disabled"
        if bm.get("busy"):
            return f"bitmap {name} on {node} is in use by another operation"
        if not bm.get("persistent"):
            return f"bitmap {name} on {node} is not persistent (re-created by hand?)"
    return None


def plan(bdir: BackupDir, disks: dict[str, Disk], level: str) -> Plan:
    point = bdir.state.next_point
    reason = full_reason(bdir, disks)
    if level == "inc" and reason is not None:
        raise ToolError(f"cannot take an incremental backup: {reason}")
    if level == "full":
        reason = "--level full"
    if reason is not None:
        return Plan("full", reason, point, point, None, bdir.bitmap_name(point))
    chain = bdir.latest_chain()
    assert chain is not None
    return Plan("inc", "", point, chain.chain, chain, bdir.bitmap_name(chain.chain))


# -- the run -------------------------------------------------------------------------------------
@dataclass
class Run:
    bdir: BackupDir
    mon: Monitor
    opts: BackupOptions
    rep: Reporter
    plan: Plan
    disks: dict[str, Disk]
    chain_dir: Path = field(init=False)
    jobs: dict[str, str] = field(default_factory=dict)  # job id -> disk
    targets: dict[str, str] = field(default_factory=dict)  # disk -> target node
    copied: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    #: seconds per phase, for the --json result (where a run's time goes)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.chain_dir = self.bdir.path / chain_dir_name(self.plan.chain_no)

    def files(self) -> list[Path]:
        out = []
        for node in self.disks:
            out.append(self.chain_dir / layer_name(node, self.plan.point))
            out.append(self.chain_dir / sums_name(node, self.plan.point))
        return out

    async def execute(self) -> Point:
        p = self.plan
        st = self.bdir.state
        st.run = {
            "point": p.point,
            "chain": chain_dir_name(p.chain_no),
            "new-chain": p.level == "full",
            "files": [str(f.relative_to(self.bdir.path)) for f in self.files()],
            "pid": os.getpid(),
            "started": now_iso(),
        }
        self.bdir.save_state()
        try:
            for phase, step in (
                ("create", self._create_targets),
                ("start", self._start),
                ("copy", self._follow),
                ("close", self._close_targets),
            ):
                t0 = time.monotonic()
                await step()
                self.timings[phase] = round(time.monotonic() - t0, 3)
            t0 = time.monotonic()
            point = await self._record()
            self.timings["record"] = round(time.monotonic() - t0 - self.timings["hash"], 3)
        except BaseException as exc:
            why = _describe(exc)
            await self._clean_up(why)
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
                self.rep.note(
                    f"point {p.point} interrupted; the partial backup was removed and the next "
                    "run will be a full backup"
                )
            if isinstance(exc, ToolError):
                raise ToolError(
                    f"point {p.point} failed: {why}; the partial backup was removed and the "
                    "next run will be a full backup",
                    exc.code,
                ) from None
            raise
        await self._drop_old_bitmaps()
        return point

    async def _create_targets(self) -> None:
        p = self.plan
        if p.level == "full":
            self.chain_dir.mkdir(exist_ok=True)
        for node, disk in self.disks.items():
            backing = None
            if p.chain is not None:
                backing = p.chain.points[-1].disks[node].layer
            path = self.chain_dir / layer_name(node, p.point)
            await create_layer(path, disk.size, CLUSTER, backing)

    async def _start(self) -> None:
        p = self.plan
        actions: list[dict[str, Any]] = []
        async with self.mon.session() as s:
            for i, node in enumerate(self.disks):
                path = self.chain_dir / layer_name(node, p.point)
                tnode = self.bdir.target_node(p.point, i)
                await s.execute(
                    "blockdev-add",
                    {
                        "driver": "qcow2",
                        "node-name": tnode,
                        "file": {"driver": "file", "filename": str(path)},
                    },
                )
                self.targets[node] = tnode  # from here on, ours to delete
                self.jobs[self.bdir.job_id(p.point, i)] = node
            if p.level == "full":
                for node in self.targets:
                    actions += await self._bitmap_actions(s, node)
            for job, node in self.jobs.items():
                args: dict[str, Any] = {
                    "job-id": job,
                    "device": node,
                    "target": self.targets[node],
                    "sync": "full" if p.level == "full" else "incremental",
                    "auto-dismiss": False,
                }
                if p.level == "inc":
                    args["bitmap"] = p.bitmap
                if self.opts.speed:
                    args["speed"] = self.opts.speed
                if self.opts.compress:
                    args["compress"] = True
                actions.append({"type": "blockdev-backup", "data": args})
            txn: dict[str, Any] = {"actions": actions}
            if p.level == "inc":
                txn["properties"] = {"completion-mode": "grouped"}
            await s.execute("transaction", txn)
        self.rep.event("started", point=p.point, level=p.level, jobs=list(self.jobs))
        self.rep.start(list(self.targets))

    async def _bitmap_actions(self, s: Session, node: str) -> list[dict[str, Any]]:
        """Start the chain's bitmap with the backup: add it, or clear one an earlier failed
        attempt at this same point left (re-enabled if it was disabled)."""
        name = self.plan.bitmap
        bm = self.disks[node].bitmaps.get(name)
        data = {"node": node, "name": name}
        if bm is not None and bm.get("busy"):
            raise ToolError(f"bitmap {name} on {node} is in use by another operation")
        if bm is not None and (bm.get("inconsistent") or not bm.get("persistent")):
            await s.execute("block-dirty-bitmap-remove", data)
            bm = None
        if bm is None:
            return [{"type": "block-dirty-bitmap-add", "data": {**data, "persistent": True}}]
        out = [{"type": "block-dirty-bitmap-clear", "data": data}]
        if not bm.get("recording"):
            out.append({"type": "block-dirty-bitmap-enable", "data": data})
        return out

    async def _follow(self) -> None:
        """Poll the jobs until every one concluded; raise the first real error."""
        errors: dict[str, str] = {}
        cancelled = False
        first: tuple[float, int] | None = None  # (when, bytes done) at the first look
        while True:
            try:
                infos = await self.mon.execute("query-jobs")
            except (DaemonUnreachable, DaemonLost) as exc:
                raise DaemonLost(f"the daemon went away during the backup ({exc})") from None
            mine = {j["id"]: j for j in infos if j["id"] in self.jobs}
            for jid, node in self.jobs.items():
                job = mine.get(jid)
                if job is None:
                    raise ToolError(f"job {jid} of {node} disappeared from the daemon")
                self.rep.update(node, job["current-progress"], job["total-progress"])
                if job["status"] == "concluded" and "error" in job:
                    errors.setdefault(node, job["error"])
            if all(j["status"] == "concluded" for j in mine.values()):
                break
            done = sum(j["current-progress"] for j in mine.values())
            left = sum(j["total-progress"] - j["current-progress"] for j in mine.values())
            now = time.monotonic()
            first = first or (now, done)
            rate = (done - first[1]) / (now - first[0]) if now > first[0] else 0.0
            if errors and not cancelled:
                # individual completion (full runs): stop the other disks too
                cancelled = True
                async with self.mon.session() as s:
                    for jid, j in mine.items():
                        if j["status"] != "concluded":
                            with contextlib.suppress(QmpFailed):
                                await s.execute("job-cancel", {"id": jid})
            await asyncio.sleep(POLL if errors else next_poll(rate, left))
        if errors:
            real = {n: e for n, e in errors.items() if e != "Operation canceled"} or errors
            node, err = next(iter(real.items()))
            raise ToolError(f"the backup of {node} failed: {err}")
        for jid, node in self.jobs.items():
            self.copied[node] = mine[jid]["total-progress"]
        self.rep.finish(True)
        await finish_jobs(self.mon, list(self.jobs), cancel=False)
        self.jobs.clear()

    async def _close_targets(self) -> None:
        failed = await delete_nodes(self.mon, list(self.targets.values()))
        if failed:
            raise ToolError(f"closing the backup failed: {'; '.join(failed)}")
        self.targets.clear()

    def _earlier_sums(self) -> dict[str, list[digest.Sums]]:
        """Per disk, the sums of the chain's layers up to the previous point, base first."""
        chain = self.plan.chain
        if chain is None:
            return {node: [] for node in self.disks}
        last = chain.points[-1].point
        return {
            node: [digest.read_sums(self.chain_dir / n) for n in chain.sums_up_to(last, node)]
            for node in self.disks
        }

    @staticmethod
    def _hash_layer(path: Path, size: int) -> digest.Sums:
        """The sums of the layer just written (in a worker thread: it reads the whole layer)."""
        lm = read_map(path)
        if lm.size != size:
            raise ToolError(f"{path} has size {lm.size}, the disk {size}")
        return digest.Sums.from_chunks(lm, hash_chunks(lm))

    async def _record(self) -> Point:
        """Hash the new layers, write the manifest, then take the point number."""
        p = self.plan
        disks: dict[str, DiskPoint] = {}
        self.timings["hash"] = 0.0
        earlier = await asyncio.to_thread(self._earlier_sums)
        for node, disk in self.disks.items():
            path = self.chain_dir / layer_name(node, p.point)
            t0 = time.monotonic()
            sums = await asyncio.to_thread(self._hash_layer, path, disk.size)
            self.timings["hash"] += round(time.monotonic() - t0, 3)
            spath = self.chain_dir / sums_name(node, p.point)
            await asyncio.to_thread(digest.write_sums, spath, sums)
            # (QEMU flushed the layer when it closed the node: this finds little left to do)
            await asyncio.to_thread(fsync_file, path)
            disks[node] = DiskPoint(
                layer=path.name,
                sums=spath.name,
                size=disk.size,
                copied=self.copied.get(node, 0),
                stored=path.stat().st_size,
                digest=digest.point_digest([*earlier[node], sums]),
                bitmap=p.bitmap,
            )
        fsync_dir(self.chain_dir)
        point = Point(
            point=p.point,
            time=now_iso(),
            level=p.level,
            reason=p.reason,
            seconds=round(time.monotonic() - self.started, 3),
            disks=disks,
        )
        if p.chain is None:
            chain = Chain(
                path=self.chain_dir,
                chain=p.chain_no,
                disks=list(self.disks),
                cluster_size=CLUSTER,
                created=point.time,
            )
        else:
            chain = p.chain
        chain.points.append(point)
        chain.save()
        st = self.bdir.state
        if p.chain is None:
            old = [c for c in self.bdir.chains() if c.chain != p.chain_no]
            for c in old[-1:]:
                for node in c.disks:
                    entry = {"node": node, "name": self.bdir.bitmap_name(c.chain)}
                    if entry not in st.stale_bitmaps:
                        st.stale_bitmaps.append(entry)
        st.next_point = p.point + 1
        st.run = None
        st.last_failure = None
        self.bdir.save_state()
        return point

    async def _drop_old_bitmaps(self) -> None:
        """Remove the bitmaps of chains that ended (best effort: a busy one stays listed)."""
        st = self.bdir.state
        if not st.stale_bitmaps:
            return
        keep = []
        try:
            async with self.mon.session() as s:
                for entry in st.stale_bitmaps:
                    try:
                        await s.execute("block-dirty-bitmap-remove", dict(entry))
                    except QmpFailed as exc:
                        if "in use" in exc.desc:
                            keep.append(entry)
        except ToolError:
            keep = st.stale_bitmaps
        if keep != st.stale_bitmaps:
            st.stale_bitmaps = keep
            self.bdir.save_state()

    async def _clean_up(self, why: str) -> None:
        """Undo a failed run: jobs, target nodes, the new chain's bitmaps, files, marker."""
        self.rep.finish(False)
        notes = []
        try:
            await finish_jobs(self.mon, list(self.jobs), cancel=True)
            failed = await delete_nodes(self.mon, list(self.targets.values()))
            if failed:
                notes.append(f"could not close {', '.join(failed)}")
            if self.plan.level == "full":
                async with self.mon.session() as s:
                    for node in self.disks:
                        with contextlib.suppress(QmpFailed):
                            await s.execute(
                                "block-dirty-bitmap-remove",
                                {"node": node, "name": self.plan.bitmap},
                            )
        except ToolError:
            pass  # the daemon is gone: it holds nothing of ours any more
        remove_run_files(self.bdir)
        self.bdir.state.last_failure = {
            "time": now_iso(),
            "point": self.plan.point,
            "reason": why,
        }
        self.bdir.save_state()
        for n in notes:
            self.rep.note(n)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        return "interrupted"
    return str(exc)


def remove_run_files(bdir: BackupDir) -> None:
    """Delete what the run in the marker created, and the marker."""
    run = bdir.state.run
    if run is None:
        return
    for rel in run["files"]:
        path = bdir.path / rel
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(FileNotFoundError):
            path.with_name(f".{path.name}.tmp").unlink()
    chain_dir = bdir.path / run["chain"]
    if run.get("new-chain") and chain_dir.is_dir() and not (chain_dir / "manifest.json").exists():
        with contextlib.suppress(OSError):
            chain_dir.rmdir()
    bdir.state.run = None


def recover(bdir: BackupDir, rep: Reporter) -> None:
    """Finish the books of a run whose process died (we hold the lock, so it is gone)."""
    run = bdir.state.run
    if run is None:
        return
    point = run["point"]
    manifest = bdir.path / run["chain"] / "manifest.json"
    if manifest.exists() and Chain.load(manifest.parent).point(point) is not None:
        # it died after writing the manifest: the point is complete
        bdir.state.next_point = point + 1
        bdir.state.run = None
        bdir.state.last_failure = None
        bdir.save_state()
        return
    rep.note(f"the run for point {point} was interrupted; removing its partial files")
    remove_run_files(bdir)
    bdir.state.last_failure = {
        "time": now_iso(),
        "point": point,
        "reason": f"the run for point {point} was interrupted",
    }
    bdir.save_state()


async def backup(opts: BackupOptions, rep: Reporter) -> Point:
    t0 = time.monotonic()
    bdir = BackupDir.open(opts.dir, create=True)
    with lock.writer(bdir.path):
        bdir = BackupDir.open(opts.dir)
        recover(bdir, rep)
        mon = Monitor(opts.socket, opts.busy_timeout, rep.note)
        async with mon.session() as s:
            disks, (jobs, targets) = await look(s, bdir, opts.nodes)
        await cleanup_leftovers(mon, jobs, targets, rep)
        p = plan(bdir, disks, opts.level)
        if p.level == "full":
            rep.note(f"point {p.point}: full backup: {p.reason}")
        else:
            assert p.chain is not None
            rep.note(f"point {p.point}: incremental backup on point {p.chain.points[-1].point}")
        rep.event("plan", point=p.point, level=p.level, reason=p.reason)
        run = Run(bdir, mon, opts, rep, p, disks)
        prepare = round(time.monotonic() - t0, 3)
        point = await run.execute()
        rep.event("timings", prepare=prepare, **run.timings)
    return point
