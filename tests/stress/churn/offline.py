"""The images after the daemon stopped (or was killed): ``qemu-img check``, the bitmap flags
``qemu-img info`` shows, and, read through qemu-storage-daemon, every consistent bitmap and
every unit of data compared with the shadow record.

qemu-storage-daemon serves them read-only, so what is compared is what any QEMU would find:
the test does not read its own daemon's idea of the image.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from support import start_blockd, start_qsd

from blockd.nbd.client import NbdClient
from churn.checks import (
    bad_log_lines,
    compare_bitmap,
    compare_data,
    dirty_units,
    image_bitmaps,
    image_check,
    read_all,
)
from churn.model import BitmapModel, ImageModel, zeros
from churn.qmp import Qmp


async def verify_images(tmp: Path, images: list[ImageModel], crashed: bool) -> list[str]:
    """Problems found in *images*. After a crash, leaked clusters are tolerated, bitmaps
    marked in use are skipped, and a consistent bitmap need only hold every answered
    write (it may hold more)."""
    problems: list[str] = []
    readable: list[tuple[ImageModel, list[str]]] = []
    checks = await asyncio.gather(*(image_check(img.path) for img in images))
    infos = await asyncio.gather(*(image_bitmaps(img.path) for img in images))
    for img, (rc, out), stored in zip(images, checks, infos, strict=True):
        if rc not in ((0, 3) if crashed else (0,)):
            problems.append(f"{img.path.name}: qemu-img check exited {rc}: {out[:600]}")
            if rc != 3:
                continue
        usable = []
        for name, info in stored.items():
            in_use = "in-use" in info["flags"]
            if not crashed and in_use:
                problems.append(f"{img.path.name}: bitmap {name} in use after a clean stop")
            elif in_use:
                continue
            elif name in img.bitmaps and img.bitmaps[name].persistent:
                usable.append(name)
            elif name in img.removed:
                problems.append(f"{img.path.name}: removed bitmap {name} still stored consistent")
            elif not crashed:
                problems.append(f"{img.path.name}: bitmap {name} stored but never added")
        if not crashed:
            for name, bm in img.bitmaps.items():
                if bm.persistent and name not in stored:
                    problems.append(f"{img.path.name}: persistent bitmap {name} was not stored")
        readable.append((img, usable))
    if readable:
        problems += await _read_through_qsd(tmp, readable, crashed)
    return problems


def _expected_after_crash(img: ImageModel, bm: BitmapModel) -> BitmapModel | None:
    """A bitmap that a backup held at the kill may have been cleared by it (its job ended,
    the node was closed and stored it, and the client had not yet seen the end): then it
    holds only what was written after the backup started. What it must hold either way is
    what was written after the backup command was answered (nothing, if the kill came
    before the answer)."""
    if bm.cleared_by_job is None:
        return None
    sent, acked = bm.cleared_by_job
    since = img.since(sent, acked)[0] if acked is not None else zeros(img.units)
    return dataclasses.replace(bm, must=bm.must & since)


async def _read_through_qsd(
    tmp: Path, readable: list[tuple[ImageModel, list[str]]], crashed: bool
) -> list[str]:
    problems: list[str] = []
    qsd = start_qsd(tmp, name="qsd-verify")
    sock = tmp / "qsd-verify-nbd.sock"
    qmp = Qmp(qsd.sock, "verify", problems)
    try:
        await qmp.connect()
        await qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        for i, (img, bitmaps) in enumerate(readable):
            node = f"v{i}"
            file = {"driver": "file", "filename": str(img.path), "read-only": True}
            r = await qmp.cmd(
                "blockdev-add",
                {"driver": "qcow2", "node-name": node, "read-only": True, "file": file},
            )
            if "error" in r:
                problems.append(f"{img.path.name}: qemu-storage-daemon cannot open it: {r}")
                continue
            export = {"type": "nbd", "id": node, "node-name": node, "bitmaps": bitmaps}
            r = await qmp.cmd("block-export-add", export)
            if "error" in r:
                problems.append(f"{img.path.name}: cannot export {bitmaps}: {r}")
                continue
            conn = await NbdClient.connect(
                ("unix", str(sock)), node, contexts=[f"qemu:dirty-bitmap:{b}" for b in bitmaps]
            )
            try:
                where = f"{img.path.name} (stored)"
                for name in bitmaps:
                    actual = await dirty_units(conn, name, img.size)
                    bm = _expected_after_crash(img, img.bitmaps[name]) if crashed else None
                    problems += compare_bitmap(where, bm or img.bitmaps[name], actual, not crashed)
                problems += compare_data(where, img, await read_all(conn, img.size), crashed)
            finally:
                await conn.disconnect()
    finally:
        await qmp.close()
        qsd.stop()
    return problems


async def reopen_after_crash(tmp: Path, images: list[ImageModel]) -> list[str]:
    """What a user does after the crash: open every image in a new daemon. A bitmap the
    image flags in use shows as inconsistent (and can only be removed), the others as
    consistent; closing stores the consistent ones and leaves nothing in use."""
    problems: list[str] = []
    before = await asyncio.gather(*(image_bitmaps(img.path) for img in images))
    daemon = start_blockd(tmp, "--log-level", "info", name="blockd-after")
    qmp = Qmp(daemon.sock, "after", problems)
    try:
        await qmp.connect()
        for i, (img, stored) in enumerate(zip(images, before, strict=True)):
            node = f"n{i}"
            file = {"driver": "file", "filename": str(img.path)}
            opts = {"driver": "qcow2", "node-name": node, "file": file}
            r = await qmp.cmd("blockdev-add", opts)
            if "error" in r:
                problems.append(f"{img.path.name}: cannot open it after the crash: {r['error']}")
                continue
            nodes = (await qmp.cmd("query-named-block-nodes", {"flat": True}))["return"]
            shown = next(n for n in nodes if n["node-name"] == node).get("dirty-bitmaps", [])
            flags = {b["name"]: bool(b.get("inconsistent")) for b in shown}
            expected = {name: "in-use" in info["flags"] for name, info in stored.items()}
            if flags != expected:
                problems.append(f"{img.path.name}: bitmaps {flags}, stored as {stored}")
            for name in [n for n, bad in flags.items() if bad]:
                r = await qmp.cmd("block-dirty-bitmap-remove", {"node": node, "name": name})
                if "error" in r:
                    problems.append(f"{img.path.name}: cannot remove {name}: {r['error']}")
            r = await qmp.cmd("blockdev-del", {"node-name": node})
            if "error" in r:
                problems.append(f"{img.path.name}: blockdev-del after the crash: {r['error']}")
    finally:
        await qmp.close()
        if daemon.stop() != 0:
            problems.append("the daemon opened after the crash did not exit cleanly")
    problems += [f"after the crash: {line}" for line in bad_log_lines(daemon.log_text())]
    after = await asyncio.gather(*(image_bitmaps(img.path) for img in images))
    for img, stored in zip(images, after, strict=True):
        in_use = [name for name, info in stored.items() if "in-use" in info["flags"]]
        if in_use:
            problems.append(f"{img.path.name}: {in_use} still in use after a clean close")
    return problems
