"""A stress run: the images, the shared nodes and their exports, the clients, an optional
``kill -9`` at a random moment, and the checks afterwards.

Shared nodes are qcow2 images opened once, exported writable, and used by every client at the
same time (each writes its own units; bitmaps, backups and merges of anyone's bitmaps go on
beside). Each client also owns an image it opens, exports and closes again.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import random
import shutil
import signal
import time
import traceback
from pathlib import Path

from support import Daemon

from blockd.nbd.client import NbdClient
from churn.backups import run_backup
from churn.checks import (
    bad_log_lines,
    compare_bitmap,
    compare_data,
    dirty_units,
    image_check,
    open_fds,
    read_all,
)
from churn.client import Client, create_image
from churn.model import Clock, ImageModel
from churn.offline import reopen_after_crash, verify_images
from churn.qmp import Qmp

MiB = 1 << 20
SIZE = 8 * MiB
#: The persistent bitmap every image has before the run (no client removes it).
PRE_BITMAP = "pre"


class World:
    def __init__(
        self,
        tmp: Path,
        daemon: Daemon,
        seed: int,
        *,
        nclients: int = 16,
        seconds: float = 30.0,
        nshared: int = 3,
        kill_after: float | None = None,
    ) -> None:
        self.tmp = tmp
        self.daemon = daemon
        self.seed = seed
        self.nclients = nclients
        self.seconds = seconds
        self.kill_after = kill_after
        self.clock = Clock()
        self.rng = random.Random(seed)
        self.nbd_sock = tmp / "nbd.sock"
        self.internal: list[str] = []
        self.anomalies: list[str] = []
        self.stats: collections.Counter[str] = collections.Counter()
        self.killed = False
        self.nwrites = 0
        self.clients: list[Client] = []
        self.deadline = 0.0
        self._ids = itertools.count(1)
        self._locks: dict[int, asyncio.Lock] = {}
        #: Every backup target on disk; True once it must be a valid image.
        self.targets: dict[Path, bool] = {}
        clusters = [65536, 32768, 4096]
        self.shared = {
            f"sh{i}": ImageModel(tmp / f"sh{i}.qcow2", SIZE, clusters[i % 2])
            for i in range(nshared)
        }
        self.own = [
            ImageModel(tmp / f"own{i}.qcow2", SIZE, self.rng.choice(clusters))
            for i in range(nclients)
        ]
        self.shared_units = SIZE // 4096
        self.ctl = Qmp(daemon.sock, "ctl", self.internal)
        self.base_fds = 0
        #: How often clients write shared nodes, flush them, work on their own node, change
        #: bitmaps, start backups, and send requests that must fail. A run that ends with
        #: kill -9 is short: it favours the own nodes, which go through open, write, store
        #: and reopen, so that persistent bitmaps are on disk when the daemon dies.
        self.weights = [30, 3, 25, 20, 8, 5] if kill_after is None else [20, 3, 45, 25, 3, 4]
        self.own_bitmaps = 0.3 if kill_after is None else 0.6

    # -- helpers for the clients ---------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self.killed or time.monotonic() > self.deadline

    def anomaly(self, what: str) -> None:
        if not self.killed:
            self.anomalies.append(what)

    def fail(self, what: str, exc: BaseException) -> None:
        self.anomaly(f"{what}: {''.join(traceback.format_exception(exc))}")

    def write_id(self) -> int:
        self.nwrites += 1
        return next(self._ids)

    def lock(self, img: ImageModel) -> asyncio.Lock:
        """Bitmap changes on one image, one client at a time (so a merge reads its sources
        as the record has them); data writes never take it."""
        return self._locks.setdefault(id(img), asyncio.Lock())

    async def backup(self, c: Client, job: str, node: str, img: ImageModel) -> None:
        try:
            await run_backup(c, job, node, img)
        except Exception as exc:
            if not self.killed and not isinstance(exc, ConnectionError):
                self.fail(f"{c.tag}: backup {job}", exc)

    async def export_gone(self, qmp: Qmp, export_id: str) -> bool:
        for _ in range(250):
            r = await qmp.cmd("query-block-exports")
            if all(e["id"] != export_id for e in r["return"]):
                return True
            await asyncio.sleep(0.02)
        return False

    # -- the run -------------------------------------------------------------------------
    async def setup(self) -> None:
        blank: dict[int, Path] = {}
        for img in [*self.shared.values(), *self.own]:
            if img.cluster not in blank:
                blank[img.cluster] = self.tmp / f"blank-{img.cluster}.qcow2"
                create_image(blank[img.cluster], img.size, img.cluster, PRE_BITMAP)
            shutil.copyfile(blank[img.cluster], img.path)
            # Every image starts with a stored persistent bitmap, so that from the first
            # open on there is one that must follow every write (and be flagged in use).
            img.add_bitmap(PRE_BITMAP, 65536, True, 0, 0)
        await self.ctl.connect()
        addr = {"type": "unix", "data": {"path": str(self.nbd_sock)}}
        await self._ok("nbd-server-start", {"addr": addr, "max-connections": 0})
        self.base_fds = open_fds(self.daemon.proc.pid)
        for i, (name, img) in enumerate(self.shared.items()):
            file = {"driver": "file", "filename": str(img.path)}
            opts = {"driver": "qcow2", "node-name": name, "file": file}
            if i == 1:
                opts["discard"] = "unmap"
            await self._ok("blockdev-add", opts)
            export = {"type": "nbd", "id": f"x-{name}", "node-name": name, "writable": True}
            await self._ok("block-export-add", export)

    async def _ok(self, execute: str, args: dict[str, object] | None = None) -> dict[str, object]:
        r = await self.ctl.cmd(execute, args)
        assert "return" in r, f"{execute} {args}: {r}"
        return r

    async def run(self) -> None:
        clients = [Client(self, i) for i in range(self.nclients)]
        self.deadline = time.monotonic() + self.seconds
        tasks = [asyncio.create_task(c.run()) for c in clients]
        if self.kill_after is not None:
            await asyncio.sleep(self.kill_after)
            self.killed = True
            os.kill(self.daemon.proc.pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
        self.clients = clients

    # -- after a clean run ---------------------------------------------------------------
    async def finish(self) -> list[str]:
        """Check every live bitmap and all data over NBD, delete everything, then check what
        is left: nodes, exports, jobs, fds, the log, and the images as stored."""
        problems: list[str] = []
        for c in self.clients:
            if c.own_open:
                problems += await self._verify_live(c.own_node, c.own)
        for name, img in self.shared.items():
            problems += await self._verify_live(name, img)
        for name in self.shared:
            await self._ok("block-export-del", {"id": f"x-{name}"})
            await self._ok("blockdev-del", {"node-name": name})
        for c in self.clients:
            if c.own_open:
                await self._ok("blockdev-del", {"node-name": c.own_node})
                if c.own_file_node is not None:
                    await self._ok("blockdev-del", {"node-name": c.own_file_node})
        for query in ("query-named-block-nodes", "query-block-exports", "query-jobs"):
            left = (await self._ok(query))["return"]
            if left:
                problems.append(f"{query} after deleting everything: {left}")
        fds = open_fds(self.daemon.proc.pid)
        for _ in range(100):  # sessions of the clients that just left may still be closing
            if fds <= self.base_fds:
                break
            await asyncio.sleep(0.05)
            fds = open_fds(self.daemon.proc.pid)
        if fds != self.base_fds:
            problems.append(f"daemon has {fds} fds open, {self.base_fds} before the run")
        await self.ctl.close()
        rc = self.daemon.stop()
        if rc != 0:
            problems.append(f"daemon exited {rc}")
        problems += bad_log_lines(self.daemon.log_text())
        images = [*self.shared.values(), *self.own]
        problems += await verify_images(self.tmp, images, crashed=False)
        left = [p.name for p in self.targets if p.exists()]
        if left:
            problems.append(f"backup targets left: {left}")
        return problems

    async def _verify_live(self, node: str, img: ImageModel) -> list[str]:
        names = list(img.bitmaps)
        export = {"type": "nbd", "id": f"v-{node}", "name": f"v-{node}", "node-name": node}
        export |= {"writable": True, "bitmaps": names}
        r = await self.ctl.cmd("block-export-add", export)
        if "error" in r:
            return [f"cannot export {node} with {names}: {r['error']}"]
        problems: list[str] = []
        conn = await NbdClient.connect(
            ("unix", str(self.nbd_sock)),
            f"v-{node}",
            contexts=[f"qemu:dirty-bitmap:{n}" for n in names],
        )
        try:
            for name in names:
                actual = await dirty_units(conn, name, img.size)
                problems += compare_bitmap(f"{node} (live)", img.bitmaps[name], actual, True)
                self.stats["bitmap compared at the end"] += 1
            problems += compare_data(f"{node} (live)", img, await read_all(conn, img.size), False)
        finally:
            await conn.disconnect()
        r = await self.ctl.cmd("block-export-del", {"id": f"v-{node}", "mode": "hard"})
        if "error" in r or not await self.export_gone(self.ctl, f"v-{node}"):
            problems.append(f"block-export-del v-{node}: {r}")
        return problems

    # -- after kill -9 -------------------------------------------------------------------
    async def after_kill(self) -> list[str]:
        self.daemon.proc.wait(timeout=30)
        await self.ctl.close()
        images = [*self.shared.values(), *self.own]
        problems = await verify_images(self.tmp, images, crashed=True)
        if not problems:
            problems = await reopen_after_crash(self.tmp, images)
        for path, must_be_valid in self.targets.items():
            if path.exists() and must_be_valid:
                rc, out = await image_check(path)
                if rc not in (0, 3):
                    problems.append(f"backup target {path.name}: qemu-img check {rc}: {out[:400]}")
        return problems

    def summary(self) -> str:
        top = ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items()))
        return f"seed {self.seed}: {self.nwrites} writes; {top}"
