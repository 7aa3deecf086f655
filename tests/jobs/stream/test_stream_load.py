"""Streams under a guest: eight NBD clients rewrite and read back random 4 KiB blocks of the
disk (sub-cluster writes, write-zeroes, reads of never-written data) while the job copies the
chain up, and every read must show exactly what the disk holds. Twenty seeds, a third of them
cancelled at a random moment in their first 0.3 s; afterwards each chain must pass qemu-img
check and read, off line, what the guest last saw. scripts/stream_guest.py does it at 1 GiB."""

from __future__ import annotations

import json
from pathlib import Path

from chainsupport import raw_copy
from streamload import MiB, add_chain, build_template, chain_copy, run_seed
from support import connect, qemu_img, start_blockd

SIZE = 4 * MiB
SEEDS = 20
#: The job lasts a few tenths of a second per seed: hundreds of guest requests each time.
SPEED = 8 * MiB


async def test_guest_never_reads_stale_data(tmp_path: Path) -> None:
    template = tmp_path / "template"
    template.mkdir()
    build_template(template, SIZE, seed=77)
    shadow = raw_copy(template / "top.qcow2", tmp_path / "start.raw")
    nbd = tmp_path / "nbd.sock"
    daemon = start_blockd(tmp_path)
    results = []
    try:
        async with connect(daemon.sock) as (qmp, events):
            await qmp.execute(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}}
            )
            for seed in range(SEEDS):
                d = tmp_path / f"seed{seed}"
                chain_copy(template, d)
                await add_chain(qmp, d, f"-{seed}")
                export = {
                    "type": "nbd",
                    "id": f"s{seed}",
                    "name": f"s{seed}",
                    "node-name": f"top-{seed}",
                }
                await qmp.execute("block-export-add", {**export, "writable": True})
                # A seed to cancel streams the whole chain, copies one chunk and then sleeps
                # (1 byte/s): the cancel always meets a running job, while the guest's reads
                # go on copying up.
                cancel = seed % 3 == 2
                res = await run_seed(
                    qmp,
                    events,
                    d,
                    nbd,
                    seed,
                    shadow,
                    speed=1 if cancel else SPEED,
                    cancel=cancel,
                    cancel_within=0.3,
                    base=None if cancel else "random",
                )
                assert not res.errors, (seed, res.errors[:3])
                results.append(res)
                await qmp.execute("block-export-del", {"id": f"s{seed}"})
                await events.wait_for(lambda e: e["event"] == "BLOCK_EXPORT_DELETED")
                events.events.clear()
                for name in ("top", "mid", "base"):
                    await qmp.execute("blockdev-del", {"node-name": f"{name}-{seed}"})
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
    print([(r.seed, r.event[10:], r.ops, r.checked, round(r.seconds, 2)) for r in results])
    cancelled = [r.seed for r in results if r.event == "BLOCK_JOB_CANCELLED"]
    assert cancelled == [seed for seed in range(SEEDS) if seed % 3 == 2]
    # The guest was busy during every job (how busy depends on the machine's load).
    assert all(r.checked > 0 for r in results) and sum(r.checked for r in results) > 1000
    for r in results:
        d = tmp_path / f"seed{r.seed}"
        for name in ("base", "mid", "top"):
            res = qemu_img("check", "--output=json", d / f"{name}.qcow2", check=False)
            assert res.returncode == 0, (r.seed, name, res.stdout)
        same = qemu_img("compare", "-f", "raw", "-F", "qcow2", d / "guest.raw", d / "top.qcow2")
        assert same.returncode == 0, (r.seed, same.stdout)
        info = json.loads(qemu_img("info", "--output=json", d / "top.qcow2").stdout)
        if r.event == "BLOCK_JOB_CANCELLED":
            assert info["backing-filename"] == "mid.qcow2"
        else:
            assert info.get("backing-filename") in (None, str(d / "base.qcow2")), info
