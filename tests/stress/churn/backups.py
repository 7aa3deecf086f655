"""One backup of the stress run, start to check: ``blockdev-backup`` to a node the client made
or ``drive-backup`` to a file the daemon creates; sync full, top, bitmap (every bitmap mode)
or none; sometimes rate-limited, sometimes cancelled. At the end the bitmap follows QEMU's
rules in the shadow record, and a finished copy is compared unit by unit with what the source
held when the job started (copy-before-write under concurrent writers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from churn.checks import image_check, run_tool
from churn.model import UNIT, BitmapModel, ImageModel, decode_unit

if TYPE_CHECKING:
    from bitarray import bitarray

    from churn.client import Client

MiB = 1 << 20
#: The backup's copy granule for the targets made here (64 KiB clusters).
COPY_CLUSTER = 65536


async def run_backup(c: Client, job: str, node: str, img: ImageModel) -> None:
    world = c.world
    rng = c.rng
    kind = rng.choice(["blockdev-backup", "drive-backup"])
    sync = rng.choices(["full", "top", "bitmap", "none"], [35, 15, 35, 15])[0]
    path = world.tmp / f"t-{job}.qcow2"
    args: dict[str, Any] = {"job-id": job, "device": node, "sync": sync}
    speed = rng.choice([0, 0, 4 * MiB, 16 * MiB])
    if speed:
        args["speed"] = speed
    # Some jobs wait for job-finalize (or a cancel while pending), some for job-dismiss.
    manual = rng.random() < 0.2
    keep = rng.random() < 0.2
    if manual:
        args["auto-finalize"] = False
    if keep:
        args["auto-dismiss"] = False
    target_node = None
    if kind == "blockdev-backup":
        rc, out = await run_tool("qemu-img", "create", "-q", "-f", "qcow2", path, str(img.size))
        assert rc == 0, out
        world.targets[path] = True
        target_node = f"t-{job}"
        file = {"driver": "file", "filename": str(path)}
        opts = {"driver": "qcow2", "node-name": target_node, "file": file}
        if not await c.ok("blockdev-add", opts):
            await _drop_target(c, None, path)
            return
        args["target"] = target_node
    else:
        world.targets[path] = False  # until the daemon says it created it
        args |= {"target": str(path), "format": "qcow2"}

    bm: BitmapModel | None = None
    mode = None
    must_at_start: bitarray | None = None
    async with world.lock(img) if sync == "bitmap" else contextlib.nullcontext():
        if sync == "bitmap":
            idle = [b for b in img.bitmaps.values() if not b.busy]
            if idle:
                bm = rng.choice(idle)
                mode = rng.choice(["on-success", "always", "never"])
                args |= {"bitmap": bm.name, "bitmap-mode": mode}
                must_at_start = bm.must.copy()
                bm.busy = True
                bm.history.append(f"frozen by {job} ({mode})")
            else:
                args["sync"] = sync = "full"
        sent = c.tick()
        if bm is not None and mode != "never":
            bm.cleared_by_job = (sent, None)
        r = await c.qmp.cmd(kind, args)
        acked = c.tick()
        if bm is not None and mode != "never":
            bm.cleared_by_job = (sent, acked)
    if "error" in r:
        c.anomaly(f"{kind} {args}: {r['error']}")
        if bm is not None:
            bm.busy = False
            bm.cleared_by_job = None
        await _drop_target(c, target_node, path)
        return
    world.targets[path] = True
    world.stats[f"backup {sync}"] += 1
    c.live_job = job

    cancel = sync == "none" or rng.random() < 0.25
    if cancel:
        await asyncio.sleep(rng.uniform(0, 0.8))
        await c.qmp.cmd("job-cancel", {"id": job})  # it may have finished meanwhile
    if manual and not cancel:
        ev = await c.qmp.job_pending_or_end(job, timeout=120)
        if ev["event"] == "BLOCK_JOB_PENDING":
            verb = rng.choice(["job-finalize", "job-finalize", "job-cancel"])
            r = await c.qmp.cmd(verb, {"id": job})
            world.stats[f"{verb} while pending"] += 1
            if "error" in r:
                c.anomaly(f"{verb} of pending {job}: {r['error']}")
    ev = await c.qmp.job_end(job, timeout=120)
    if keep:
        await c.ok("job-dismiss", {"id": job})
    done = ev["event"] == "BLOCK_JOB_COMPLETED" and "error" not in ev["data"]
    if "error" in ev["data"]:
        c.anomaly(f"backup {job} failed: {ev['data']['error']}")
    world.stats["backup completed" if done else "backup cancelled"] += 1

    if bm is not None:
        async with world.lock(img):
            bm.busy = False
            bm.cleared_by_job = None
            bm.history.append(f"{job} {'done' if done else 'failed'} ({ev['event']})")
            if done and mode in ("on-success", "always"):
                img.clear_bitmap(bm, sent, acked)
            elif not done and mode == "always":
                img.clear_bitmap(bm, sent, acked, keep_may_at=COPY_CLUSTER)
    if not await _drop_target(c, target_node, path, keep=True):
        return
    rc, out = await image_check(path, share=True)
    if rc != 0:
        c.anomaly(f"backup target {path.name}: qemu-img check exited {rc}: {out[:400]}")
    elif done and sync != "none":
        whole = None if sync != "bitmap" else must_at_start
        await _check_point_in_time(c, img, path, sent, acked, whole)
    path.unlink()
    world.targets.pop(path, None)


async def _drop_target(c: Client, node: str | None, path: Path, keep: bool = False) -> bool:
    """Delete the target node (a finished job lets go of it shortly after its event)."""
    if node is not None:
        for _ in range(200):
            r = await c.qmp.cmd("blockdev-del", {"node-name": node})
            if "return" in r or "in use" not in r["error"]["desc"]:
                break
            await asyncio.sleep(0.02)
        if "error" in r:
            c.anomaly(f"blockdev-del {node}: {r['error']}")
            return False
    if not keep:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        c.world.targets.pop(path, None)
    return True


async def _check_point_in_time(
    c: Client, img: ImageModel, path: Path, sent: int, acked: int, only: bitarray | None
) -> None:
    """Each unit of the copy (or each unit of *only*) holds what the source held when the
    job started: the last write answered before the command was sent, or one in flight."""
    raw = path.with_suffix(".raw")
    rc, out = await run_tool("qemu-img", "convert", "-O", "raw", path, raw)
    if rc != 0:
        c.anomaly(f"qemu-img convert {path.name}: {out}")
        return
    data = raw.read_bytes()
    c.world.stats["backup compared"] += 1
    raw.unlink()
    bad = 0
    for u in range(img.units):
        if only is not None and not only[u]:
            continue
        allowed = img.candidates(u, sent, acked)
        if None in allowed:
            continue
        got = decode_unit(memoryview(data)[u * UNIT : (u + 1) * UNIT])
        if got not in allowed:
            bad += 1
            if bad <= 3:
                c.anomaly(
                    f"backup {path.name} of {img.path.name}: unit at {u * UNIT} holds {got}, "
                    f"the source held one of {allowed}"
                )
