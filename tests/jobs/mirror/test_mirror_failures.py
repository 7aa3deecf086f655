"""Mirror and commit when things fail: a target whose writes fail (blkdebug) under each
on-target-error policy, side by side with qemu-storage-daemon; cancels at random moments of
a mirror and an active commit under guest writes (the graph comes back as it was, the guest's
disk holds what it wrote, the images are clean)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from diffsupport import MiB, Session, blkdebug_raw_node, compare, raw_image, raw_node
from guestload import Guest, add_qcow2, daemon_with_nbd, drop_export_and_nodes, first_difference
from jobdiff import both, graph
from support import qemu_img


def _build(d: Path) -> None:
    raw_image(d / "src.raw", 4 * MiB, [(0x31, 0, MiB), (0x32, 3 * MiB, 512 * 1024)])
    raw_image(d / "tgt.raw", 4 * MiB)


def _names(s: Session) -> list[str]:
    """Event names, consecutive repeats of one BLOCK_JOB_ERROR folded into one: QEMU has up
    to 16 copies in flight and reports each one that fails, blockd stops at the first."""
    out: list[str] = []
    for name in s.names():
        if not (out and name == out[-1] and name.startswith("BLOCK_JOB_ERROR")):
            out.append(name)
    return out


@pytest.mark.qsd
@pytest.mark.parametrize("policy", ["report", pytest.param("ignore", marks=pytest.mark.slow)])
def test_source_read_errors(tmp_path: Path, policy: str) -> None:
    """A source whose reads fail once: on-source-error report ends the job with the error,
    ignore copies the range again and completes."""

    def scenario(s: Session, d: Path) -> dict[str, Any]:
        rule = {"event": "read_aio", "errno": 5, "once": True}
        s.ok("blockdev-add", blkdebug_raw_node("src", d / "src.raw", [rule]))
        s.ok("blockdev-add", raw_node("tgt", d / "tgt.raw"))
        s.ok(
            "blockdev-mirror",
            {
                "job-id": "m",
                "device": "src",
                "target": "tgt",
                "sync": "full",
                "on-source-error": policy,
            },
        )
        if policy == "ignore":
            s.wait_job("m", "ready")
            s.ok("block-job-complete", {"device": "m"})
        s.wait_job("m", "null")
        return {"events": _names(s), "same": compare(d / "src.raw", d / "tgt.raw")}

    res = both(tmp_path, _build, scenario)
    assert res["same"] == (policy == "ignore")


@pytest.mark.qsd
@pytest.mark.parametrize(
    ("policy", "errno", "once"),
    [
        ("report", 5, False),
        ("ignore", 5, True),
        ("stop", 5, True),
        pytest.param("enospc", 28, True, marks=pytest.mark.slow),
        pytest.param("enospc", 5, False, marks=pytest.mark.slow),
    ],
)
def test_target_write_errors(tmp_path: Path, policy: str, errno: int, once: bool) -> None:
    def scenario(s: Session, d: Path) -> dict[str, Any]:
        s.ok("blockdev-add", raw_node("src", d / "src.raw"))
        rule: dict[str, Any] = {"event": "write_aio", "errno": errno}
        if once:
            rule["once"] = True
        s.ok("blockdev-add", blkdebug_raw_node("tgt", d / "tgt.raw", [rule]))
        s.ok(
            "blockdev-mirror",
            {
                "job-id": "m",
                "device": "src",
                "target": "tgt",
                "sync": "full",
                "on-target-error": policy,
                "auto-dismiss": False,
            },
        )
        stopped = None
        if policy in ("stop", "enospc") and once:
            s.wait(lambda e: e["event"] == "BLOCK_JOB_ERROR")
            s.wait_job("m", "paused")
            info = s.ok("query-block-jobs")[0]
            stopped = (info["status"], info["paused"], info["io-status"])
            s.ok("block-job-resume", {"device": "m"})
        if once:
            s.wait_job("m", "ready")
            s.ok("block-job-complete", {"device": "m"})
        s.wait_job("m", "concluded")
        final = s.ok("query-block-jobs")[0]
        s.ok("job-dismiss", {"id": "m"})
        return {
            "events": _names(s),
            "stopped": stopped,
            "final": {k: final[k] for k in ("status", "io-status", "type")},
            "error": final.get("error"),
            "same": compare(d / "src.raw", d / "tgt.raw"),
            # (blockd reports blkdebug's depth as 0, QSD as 1: not a job matter)
            "after": [r for r in graph(s) if r[1] != "blkdebug"],
        }

    res = both(tmp_path, _build, scenario)
    assert res["same"] == once


def _shape(nodes: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    keys = ("node-name", "drv", "ro", "backing_file", "backing_file_depth", "dirty-bitmaps")
    return [tuple(str(n.get(k)) for k in keys) for n in nodes]


async def _cancel_at_random(d: Path, seed: int, qmp: Any, log: Any, commit: bool) -> None:
    rng = random.Random(seed)
    size = 2 * MiB
    initial = rng.randbytes(size)
    (d / "init.raw").write_bytes(initial)
    src, dst = f"s{seed}", f"t{seed}"
    qemu_img("convert", "-O", "qcow2", "-f", "raw", d / "init.raw", d / f"{dst}.qcow2")
    if commit:
        qemu_img(
            "create",
            "-f",
            "qcow2",
            "-b",
            d / f"{dst}.qcow2",
            "-F",
            "qcow2",
            d / f"{src}.qcow2",
            str(size),
        )
    else:
        qemu_img("create", "-f", "qcow2", d / f"{src}.qcow2", str(size))
        qemu_img("convert", "-n", "-O", "qcow2", "-f", "raw", d / "init.raw", d / f"{src}.qcow2")
        (d / f"{dst}.qcow2").unlink()
        qemu_img("create", "-f", "qcow2", d / f"{dst}.qcow2", str(size))
    await add_qcow2(qmp, d, dst)
    await add_qcow2(qmp, d, src, backing=dst if commit else None)
    before = _shape(await qmp.execute("query-named-block-nodes"))
    await qmp.execute(
        "block-export-add",
        {"type": "nbd", "id": "e", "node-name": src, "name": "e", "writable": True},
    )
    # a guest slower than the job's speed limit: a throttled job never catches up with a
    # faster one (in QEMU neither), and a cancel after READY must then wait for ever
    guest = Guest(d / "nbd.sock", "e", initial, seed, pause=0.01)
    await guest.start()
    since = len(log.events)
    if commit:
        await qmp.execute("block-commit", {"job-id": "j", "device": src, "speed": 32 * MiB})
    else:
        await qmp.execute(
            "blockdev-mirror",
            {
                "job-id": "j",
                "device": src,
                "target": dst,
                "sync": "full",
                "speed": 32 * MiB,
                "copy-mode": rng.choice(["background", "write-blocking"]),
            },
        )
    await asyncio.sleep(rng.uniform(0, 0.4))
    force = rng.random() < 0.5
    await qmp.execute("block-job-cancel", {"device": "j", "force": force})
    await log.wait_for(
        lambda e: (
            e in log.events[since:]
            and e["event"] == "JOB_STATUS_CHANGE"
            and e["data"] == {"id": "j", "status": "null"}
        )
    )
    ends = [e["event"] for e in log.events[since:] if e["event"].startswith("BLOCK_JOB_")]
    ready = "BLOCK_JOB_READY" in ends
    assert ends[-1] == ("BLOCK_JOB_COMPLETED" if ready and not force else "BLOCK_JOB_CANCELLED")
    await guest.finish()
    # the guest stayed on its disk, which holds all it wrote
    assert [e["node-name"] for e in await qmp.execute("query-block-exports")] == [src]
    assert first_difference(await guest.read_all(), bytes(guest.shadow)) < 0
    assert _shape(await qmp.execute("query-named-block-nodes")) == before
    await drop_export_and_nodes(qmp, log, d, "e", since, src, dst)


@pytest.mark.parametrize("commit", [False, True], ids=["mirror", "active-commit"])
async def test_cancel_at_random_moments(tmp_path: Path, commit: bool) -> None:
    async with daemon_with_nbd(tmp_path) as (qmp, log):
        for seed in range(3):
            await _cancel_at_random(tmp_path, seed, qmp, log, commit)
