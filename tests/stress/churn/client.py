"""One stress client: its own QMP connection, NBD connections to every shared export, its own
image (opened, exported, written, closed, written by qemu-io while closed), dirty bitmaps on
shared and own nodes, backups with cancels, and requests that must fail.

Every choice comes from the client's own RNG (seeded from the run's seed and its number), and
every outcome is checked against the shadow record as it comes; surprises go to
``world.anomalies``, never to an exception that would stop the other clients.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from support import qemu_img

from blockd.nbd import protocol as P
from blockd.nbd.client import NbdClient, NbdConnectError
from churn.checks import compare_bitmap, dirty_units, run_tool
from churn.model import UNIT, ImageModel, Write, decode_unit, round_out, unit_data
from churn.qmp import DaemonGone, Qmp

if TYPE_CHECKING:
    from churn.world import World

#: What a request that reaches a dead daemon can raise.
GONE = (
    DaemonGone,
    ConnectionError,
    OSError,
    EOFError,
    NbdConnectError,
    asyncio.IncompleteReadError,
)
GRANULARITIES = [None, 4096, 16384, 65536, 262144]
MAX_BITMAPS = 3


class Client:
    def __init__(self, world: World, index: int) -> None:
        self.world = world
        self.tag = f"c{index}"
        self.rng = random.Random(f"{world.seed}/{index}")
        self.qmp = Qmp(world.daemon.sock, self.tag, world.internal)
        self.own: ImageModel = world.own[index]
        self.own_node = f"own{index}"
        self.own_open = False
        self.own_file_node: str | None = None
        self.export: NbdClient | None = None
        self.exported_bitmaps: list[str] = []
        self.shared: dict[str, NbdClient] = {}
        #: Units of every shared image this client writes (no other client touches them).
        per = world.shared_units // world.nclients
        self.region = (index * per, per)
        self.backup: asyncio.Task[None] | None = None
        self.backup_source: str | None = None
        #: The id of this client's backup job once the daemon accepted it.
        self.live_job: str | None = None
        self._n = itertools.count()

    # -- plumbing ------------------------------------------------------------------------
    def anomaly(self, what: str) -> None:
        self.world.anomaly(f"{self.tag}: {what}")

    def tick(self) -> int:
        return self.world.clock()

    async def ok(self, execute: str, args: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Run a command that must succeed; an error is an anomaly (and None)."""
        r = await self.qmp.cmd(execute, args)
        if "error" in r:
            self.anomaly(f"{execute} {args}: {r['error']}; {await self.context()}")
            return None
        return r

    async def context(self) -> str:
        """The daemon's jobs and exports, to go with an anomaly."""
        jobs = (await self.qmp.cmd("query-jobs"))["return"]
        exports = (await self.qmp.cmd("query-block-exports"))["return"]
        return f"jobs {jobs}; exports {exports}"

    async def must_fail(self, execute: str, args: dict[str, Any], why: str) -> None:
        r = await self.qmp.cmd(execute, args)
        if "error" not in r:
            self.anomaly(f"{execute} {args} succeeded although {why}")
        elif r["error"]["class"] != "GenericError" and execute != "job-cancel":
            self.anomaly(f"{execute} {args}: unexpected class {r['error']}")

    # -- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self.qmp.connect()
            for name in self.world.shared:
                self.shared[name] = await NbdClient.connect(
                    ("unix", str(self.world.nbd_sock)), name
                )
            actions: list[Callable[[], Awaitable[None]]] = [
                self.write_shared,
                self.flush_shared,
                self.own_step,
                self.bitmap_step,
                self.start_backup,
                self.chaos,
            ]
            while not self.world.stopping:
                (act,) = self.rng.choices(actions, self.world.weights)
                self.world.stats[act.__name__] += 1
                await act()
            await self.teardown()
        except GONE as exc:
            if not self.world.killed:
                self.anomaly(f"connection lost: {exc!r}")
        except Exception as exc:
            if not self.world.killed:
                self.world.fail(f"{self.tag}: crashed", exc)
        finally:
            await self.drop_connections()

    async def drop_connections(self) -> None:
        if self.backup is not None and self.world.killed:
            self.backup.cancel()
        for conn in [*self.shared.values(), *([self.export] if self.export else [])]:
            await conn.close()
        await self.qmp.close()

    async def teardown(self) -> None:
        """Leave the world checkable: no job, no own export; the node open or closed."""
        if self.backup is not None:
            await self.backup
        if self.export is not None:
            await self.verify_export()
            await self.own_export_del()
        for conn in self.shared.values():
            await conn.disconnect()
        self.shared.clear()

    # -- NBD writes ----------------------------------------------------------------------
    async def write(self, img: ImageModel, conn: NbdClient, lo: int, n: int) -> None:
        start = lo + self.rng.randrange(n)
        count = min(self.rng.choice([1, 1, 2, 3, 8, 16, 64]), lo + n - start)
        kind = self.rng.choices(["data", "zero", "trim"], [80, 15, 5])[0]
        fua = self.rng.random() < 0.1
        check = self.rng.random() < 0.2
        value = self.world.write_id() if kind == "data" else 0 if kind == "zero" else None
        w = Write(value, start, count, self.tick(), dirties=kind != "trim", fua=fua)
        img.begin(w)
        off, length = start * UNIT, count * UNIT
        flags = P.CMD_FLAG_FUA if fua else 0
        try:
            if kind == "data":
                assert value is not None
                await conn.write(off, unit_data(value, count), flags)
            elif kind == "zero":
                await conn.write_zeroes(off, length, flags)
            else:
                await conn.trim(off, length, flags)
        except GONE:
            img.end(w, self.tick(), False)
            raise
        img.end(w, self.tick(), True)
        if value is not None and check:
            got = await conn.read(off, length)
            if got != unit_data(value, count):
                self.anomaly(f"{img.path.name}: read back of write {value} at {off} differs")

    async def writes(self, img: ImageModel, conn: NbdClient, lo: int, n: int) -> None:
        """One write, or a few at once on disjoint units (requests in flight together on one
        connection; each unit still sees its writes one after the other)."""
        k = 1 if self.rng.random() < 0.7 else self.rng.choice([2, 3, 4])
        sub = n // k
        await asyncio.gather(*(self.write(img, conn, lo + i * sub, sub) for i in range(k)))

    async def write_shared(self) -> None:
        name = self.rng.choice(list(self.shared))
        await self.writes(self.world.shared[name], self.shared[name], *self.region)

    async def flush_shared(self) -> None:
        name = self.rng.choice(list(self.shared))
        sent = self.tick()
        await self.shared[name].flush()
        self.world.shared[name].flushed(sent)

    # -- own image -----------------------------------------------------------------------
    async def own_step(self) -> None:
        r = self.rng.random()
        if not self.own_open:
            await (self.own_add() if r < 0.6 else self.qemu_io_write())
        elif self.export is None:
            if r < 0.6:
                await self.own_export_add()
            elif not self.backup_maybe_running(self.own_node):
                await self.own_del()
        elif r < 0.75:
            await self.writes(self.own, self.export, 0, self.own.units)
        elif r < 0.85:
            await self.verify_export()
        else:
            await self.own_export_del()

    async def own_add(self) -> None:
        file: Any = {"driver": "file", "filename": str(self.own.path)}
        if self.rng.random() < 0.5:
            self.own_file_node = f"{self.own_node}f"
            if not await self.ok("blockdev-add", {**file, "node-name": self.own_file_node}):
                self.own_file_node = None
                return
            file = self.own_file_node
        opts = {"driver": "qcow2", "node-name": self.own_node, "file": file}
        if self.rng.random() < 0.5:
            opts["discard"] = "unmap"
        if not await self.ok("blockdev-add", opts):
            return
        self.own_open = True
        self.world.stats["node add"] += 1
        await self.check_counts(self.own_node, self.own)

    async def own_del(self) -> None:
        sent = self.tick()
        if not await self.ok("blockdev-del", {"node-name": self.own_node}):
            return
        self.own.close(sent)
        self.world.stats["node del"] += 1
        self.own_open = False
        if self.own_file_node is not None:
            await self.ok("blockdev-del", {"node-name": self.own_file_node})
            self.own_file_node = None

    async def qemu_io_write(self) -> None:
        """QEMU writes the closed image (its bitmaps record it); some writes compressed, whole
        clusters, which the daemon then reads and overwrites."""
        # QEMU compresses only into unallocated clusters: pick one nothing ever wrote.
        per = self.own.cluster // UNIT
        start = self.rng.randrange(self.own.units // per) * per
        count = per
        compressed = self.rng.random() < 0.3 and not any(
            self.own.history[u] for u in range(start, start + count)
        )
        if not compressed:
            start = self.rng.randrange(self.own.units)
            count = min(self.rng.choice([1, 4, 16, 64]), self.own.units - start)
        value = self.world.write_id()
        src = self.world.tmp / f"{self.tag}.pattern"
        src.write_bytes(unit_data(value, count))
        w = Write(value, start, count, self.tick())
        self.own.begin(w)
        rc, out = await run_tool(
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            f"write -q {'-c ' if compressed else ''}-s {src} {start * UNIT} {count * UNIT}",
            self.own.path,
        )
        ok = rc == 0 and not out.strip()
        self.world.stats["qemu-io write" + (" compressed" if compressed else "")] += 1
        self.own.end(w, self.tick(), ok)
        self.own.flushed(self.tick())
        if not ok:
            self.anomaly(f"qemu-io write on closed {self.own.path.name}: {rc} {out}")

    async def own_export_add(self) -> None:
        # While a backup of the node runs, its filter owns writing to the node: a writer
        # beside it is refused (unless the job ended just before, which its event says).
        maybe = self.backup_maybe_running(self.own_node)
        refused = self.backup_running(self.own_node)
        async with self.world.lock(self.own):  # a backup starting meanwhile picks others
            idle = [n for n, bm in self.own.bitmaps.items() if not bm.busy]
            bitmaps = idle if idle and self.rng.random() < 0.6 else []
            for n in bitmaps:
                self.own.bitmaps[n].busy = True
            args = {
                "type": "nbd",
                "id": f"e-{self.tag}",
                "node-name": self.own_node,
                "writable": True,
                "bitmaps": bitmaps,
            }
            r = await self.qmp.cmd("block-export-add", args)
            if "error" in r:
                for n in bitmaps:
                    self.own.bitmaps[n].busy = False
                if not maybe or not r["error"]["desc"].startswith("Permission conflict"):
                    self.anomaly(f"block-export-add {args}: {r['error']}")
                return
        # The filter goes when the job finishes, before its end event: only a job still
        # running when the command ran (the status events come first) certainly had it.
        job = self.live_job
        if refused and job is not None and self.qmp.job_status.get(job) == "running":
            self.anomaly(f"block-export-add {args} succeeded beside a running backup")
        self.exported_bitmaps = bitmaps
        self.world.stats["export add"] += 1
        self.export = await NbdClient.connect(
            ("unix", str(self.world.nbd_sock)),
            self.own_node,
            contexts=[f"qemu:dirty-bitmap:{n}" for n in bitmaps],
        )

    async def own_export_del(self) -> None:
        assert self.export is not None
        await self.export.disconnect()
        self.export = None
        hard = self.rng.random() < 0.3
        args: dict[str, Any] = {"id": f"e-{self.tag}"}
        if hard:
            args["mode"] = "hard"
        for _ in range(100):
            r = await self.qmp.cmd("block-export-del", args)
            if "return" in r or "still in use" not in r["error"]["desc"]:
                break
            await asyncio.sleep(0.02)  # our disconnect is not processed yet
        if "error" in r:
            self.anomaly(f"block-export-del {args}: {r['error']}")
        if not await self.world.export_gone(self.qmp, f"e-{self.tag}"):
            self.anomaly(f"export e-{self.tag} never went away")
        for n in self.exported_bitmaps:
            self.own.bitmaps[n].busy = False
        self.exported_bitmaps = []

    async def verify_export(self) -> None:
        """Own bitmaps exactly as the record says (nothing else writes this image)."""
        assert self.export is not None
        for name in self.exported_bitmaps:
            bm = self.own.bitmaps[name]
            actual = await dirty_units(self.export, name, self.own.size)
            self.world.stats["bitmap compared"] += 1
            for p in compare_bitmap(f"{self.own_node} (live)", bm, actual, exact=True):
                self.anomaly(p)

    # -- bitmaps -------------------------------------------------------------------------
    def bitmap_target(self) -> tuple[str, ImageModel]:
        if self.own_open and self.rng.random() < self.world.own_bitmaps:
            return self.own_node, self.own
        name = self.rng.choice(list(self.world.shared))
        return name, self.world.shared[name]

    async def bitmap_step(self) -> None:
        node, img = self.bitmap_target()
        async with self.world.lock(img):
            if node == self.own_node and not self.own_open:
                return
            mine = [
                n for n, bm in img.bitmaps.items() if n.startswith(self.tag + "b") and not bm.busy
            ]
            idle = [n for n, bm in img.bitmaps.items() if not bm.busy]
            r = self.rng.random()
            if r < 0.3 and len(mine) < MAX_BITMAPS:
                await self.bitmap_add(node, img)
            elif r < 0.45 and mine:
                name = self.rng.choice(mine)
                if await self.ok("block-dirty-bitmap-remove", {"node": node, "name": name}):
                    img.drop_bitmap(name)
                    self.world.stats["bitmap remove"] += 1
            elif r < 0.65 and idle:
                name = self.rng.choice(idle)
                sent = self.tick()
                if await self.ok("block-dirty-bitmap-clear", {"node": node, "name": name}):
                    img.clear_bitmap(img.bitmaps[name], sent, self.tick())
                    self.world.stats["bitmap clear"] += 1
            elif r < 0.85 and mine and idle:
                await self.bitmap_merge(node, img, self.rng.choice(mine), idle)
            else:
                await self.check_counts(node, img)

    async def bitmap_add(self, node: str, img: ImageModel) -> None:
        name = f"{self.tag}b{next(self._n)}"
        gran = self.rng.choice(GRANULARITIES)
        persistent = self.rng.random() < 0.6
        args: dict[str, Any] = {"node": node, "name": name, "persistent": persistent}
        if gran is not None:
            args["granularity"] = gran
        sent = self.tick()
        if await self.ok("block-dirty-bitmap-add", args):
            img.add_bitmap(name, gran or min(65536, img.cluster), persistent, sent, self.tick())
            self.world.stats["bitmap add"] += 1

    async def bitmap_merge(self, node: str, img: ImageModel, target: str, idle: list[str]) -> None:
        sources = self.rng.sample(idle, min(len(idle), self.rng.choice([1, 2])))
        must = [img.bitmaps[s].must.copy() for s in sources]
        args = {"node": node, "target": target, "bitmaps": sources}
        if not await self.ok("block-dirty-bitmap-merge", args):
            return
        t = img.bitmaps[target]
        t.history.append(f"merged {sources} by {self.tag}")
        self.world.stats["bitmap merge"] += 1
        # A write still unanswered may already be in a source, in the source's granules.
        inflight = img.inflight_bits()
        for s, m in zip(sources, must, strict=True):
            t.must |= m
            t.may |= round_out(img.bitmaps[s].may | inflight, img.bitmaps[s].granularity)

    async def check_counts(self, node: str, img: ImageModel) -> None:
        """Every bitmap's dirty count lies between what must and what may be dirty."""
        # A backup of another client may end (and clear or merge into a bitmap) while the
        # query is out: only bitmaps idle on both sides of it, and not cleared meanwhile,
        # are checked against the must taken before.
        must = {n: bm.must.copy() for n, bm in img.bitmaps.items() if not bm.busy}
        epoch = {n: (id(bm), bm.since_sent, len(bm.history)) for n, bm in img.bitmaps.items()}
        r = await self.ok("query-named-block-nodes", {"flat": True})
        if r is None:
            return
        info = next((n for n in r["return"] if n["node-name"] == node), None)
        if info is None:
            self.anomaly(f"node {node} not listed")
            return
        shown = {b["name"]: b for b in info.get("dirty-bitmaps", []) if "name" in b}
        if set(shown) != set(img.bitmaps):
            self.anomaly(f"{node}: bitmaps {sorted(shown)}, expected {sorted(img.bitmaps)}")
            return
        inflight = img.inflight_bits()
        for name, bm in img.bitmaps.items():
            b = shown[name]
            if (
                bm.busy
                or name not in must
                or epoch.get(name) != (id(bm), bm.since_sent, len(bm.history))
            ):
                continue
            if b.get("inconsistent") or b["granularity"] != bm.granularity:
                self.anomaly(f"{node}: bitmap {name} shown as {b}")
                continue
            count = b["count"] // bm.granularity
            self.world.stats["bitmap counted"] += 1
            lo, hi = bm.granules(must[name]), bm.granules(bm.may | inflight)
            if not lo <= count <= hi:
                self.anomaly(f"{node}: bitmap {name} counts {count} granules, not in [{lo}, {hi}]")

    # -- backups -------------------------------------------------------------------------
    def backup_maybe_running(self, node: str) -> bool:
        """Whether a backup of *node* may exist (its command may be on its way)."""
        if self.backup is None or self.backup.done() or self.backup_source != node:
            return False
        return self.live_job is None or not self.qmp.ended(self.live_job)

    def backup_running(self, node: str) -> bool:
        """Whether this client's backup job of *node* exists (its end event not seen)."""
        job = self.live_job
        return job is not None and self.backup_source == node and not self.qmp.ended(job)

    async def start_backup(self) -> None:
        if self.backup is not None:
            if not self.backup.done():
                return
            await self.backup
        if self.own_open and self.export is None and self.rng.random() < 0.3:
            node, img = self.own_node, self.own
        else:
            node = self.rng.choice(list(self.world.shared))
            img = self.world.shared[node]
        job = f"{self.tag}-{next(self._n)}"
        self.live_job = None
        self.backup = asyncio.create_task(self.world.backup(self, job, node, img))
        self.backup_source = node
        await asyncio.sleep(0)

    # -- requests that must fail, and requests that must not disturb -------------------------
    async def chaos(self) -> None:
        sh = self.rng.choice(list(self.world.shared))
        img = self.world.shared[sh]
        file = {"driver": "file", "filename": str(img.path)}
        r = self.rng.randrange(7)
        if r == 0:
            opts = {"driver": "qcow2", "node-name": sh, "file": file}
            await self.must_fail("blockdev-add", opts, "the name is taken")
        elif r == 1:
            opts = {"driver": "qcow2", "node-name": f"{self.tag}x", "file": file}
            await self.must_fail("blockdev-add", opts, "the image is open read-write")
        elif r == 2:
            await self.must_fail("blockdev-del", {"node-name": sh}, "it is exported")
        elif r == 3:
            args = {"type": "nbd", "id": f"x-{sh}", "node-name": sh}
            await self.must_fail("block-export-add", args, "the id is taken")
        elif r == 4:
            await self.must_fail("job-cancel", {"id": f"{self.tag}-none"}, "there is no such job")
        elif r == 5:
            await self.look_through_export(sh, img)
        else:
            # A read-only look that shares writes: allowed beside the writer, and it must
            # not disturb it.
            name = f"{self.tag}ro"
            ro = {**file, "read-only": True}
            opts = {"driver": "qcow2", "node-name": name, "read-only": True}
            opts |= {"force-share": True, "file": {**ro, "force-share": True}}
            if await self.ok("blockdev-add", opts):
                await self.ok("blockdev-del", {"node-name": name})

    async def look_through_export(self, node: str, img: ImageModel) -> None:
        """A second, read-only export of a shared node (beside its writable one): this
        client's units read back as it last wrote them."""
        export_id = f"r-{self.tag}"
        args = {"type": "nbd", "id": export_id, "name": export_id, "node-name": node}
        if not await self.ok("block-export-add", args):
            return
        self.world.stats["export add"] += 1
        conn = await NbdClient.connect(("unix", str(self.world.nbd_sock)), export_id)
        lo, n = self.region
        start = lo + self.rng.randrange(n)
        count = min(16, lo + n - start)
        data = await conn.read(start * UNIT, count * UNIT)
        await conn.disconnect()
        now = self.tick()
        for u in range(start, start + count):
            allowed = img.candidates(u, now, now)
            got = decode_unit(memoryview(data)[(u - start) * UNIT : (u - start + 1) * UNIT])
            if None not in allowed and got not in allowed:
                self.anomaly(f"{node} via {export_id}: unit {u * UNIT} is {got}, not {allowed}")
                break
        await self.ok("block-export-del", {"id": export_id, "mode": "hard"})
        if not await self.world.export_gone(self.qmp, export_id):
            self.anomaly(f"export {export_id} never went away")


def create_image(path: Any, size: int, cluster: int, bitmap: str) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", path, str(size))
    qemu_img("bitmap", "--add", "-g", "65536", path, bitmap)
