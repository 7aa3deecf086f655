"""A backup is the image as it was when the job started, whatever is written meanwhile.

A throttled full backup runs while qemu-io writes through an NBD export of the source
(a writer outside QMP, as a guest would be). The target must equal a copy of the source taken
before the job started; the source must hold the new writes. Repeated for many seeds with
random offsets, lengths (aligned and not) and write-zeroes."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest
from diffsupport import MiB, Session, compare, raw_image, raw_node
from support import start_blockd

SIZE = 4 * MiB
SEEDS = 50
#: Slow enough that the job outlasts the writer on any machine; once the writer is done the
#: limit is lifted (block-job-set-speed), so the seeds stay quick.
SPEED = 1 * MiB


def _writes(rng: random.Random) -> list[str]:
    cmds: list[str] = []
    for _ in range(rng.randint(4, 10)):
        off = rng.randrange(0, SIZE - 1)
        n = min(rng.choice([512, 4096, 65536, 200_000, rng.randint(1, 300_000)]), SIZE - off)
        if rng.random() < 0.2:
            off -= off % 512
            n = max(512, n - n % 512)
            n = min(n, SIZE - off)
            cmds += ["-c", f"write -z {off} {n}"]
        else:
            cmds += ["-c", f"write -P {rng.randrange(1, 255)} {off} {n}"]
        cmds += ["-c", f"sleep {rng.randint(0, 25)}"]
    return cmds


def test_backup_is_point_in_time(tmp_path: Path) -> None:
    daemon = start_blockd(tmp_path)
    s = Session(daemon.sock)
    nbd_sock = tmp_path / "nbd.sock"
    try:
        s.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}})
        inside = 0
        for seed in range(SEEDS):
            rng = random.Random(seed)
            src, tgt, snap = (tmp_path / f"{n}{seed}.raw" for n in ("src", "tgt", "snap"))
            raw_image(
                src,
                SIZE,
                [
                    (rng.randrange(1, 255), rng.randrange(0, SIZE - MiB), MiB),
                    (rng.randrange(1, 255), rng.randrange(0, SIZE - 8192), 8192),
                ],
            )
            raw_image(tgt, SIZE)
            shutil.copy(src, snap)
            s.ok("blockdev-add", raw_node("src", src))
            s.ok("blockdev-add", raw_node("tgt", tgt))
            s.ok(
                "block-export-add", {"type": "nbd", "id": "e", "node-name": "src", "writable": True}
            )
            s.ok(
                "blockdev-backup",
                {
                    "job-id": "j",
                    "device": "src",
                    "target": "tgt",
                    "sync": "full",
                    "speed": SPEED,
                },
            )
            uri = f"nbd+unix:///src?socket={nbd_sock}"
            res = subprocess.run(
                ["qemu-io", "-f", "raw", *_writes(rng), uri],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert res.returncode == 0 and "error" not in res.stdout.lower(), res.stdout
            if s.ok("query-block-jobs"):
                inside += 1  # every write of this seed happened while the job ran
            s.ok("block-job-set-speed", {"device": "j", "speed": 0})
            s.wait_job("j", "null")
            assert not [e for e in s.events if e["event"] == "BLOCK_JOB_ERROR"]
            s.ok("block-export-del", {"id": "e"})
            s.wait(lambda e: e["event"] == "BLOCK_EXPORT_DELETED")
            s.events.clear()
            s.ok("blockdev-del", {"node-name": "src"})
            s.ok("blockdev-del", {"node-name": "tgt"})
            assert compare(snap, tgt), f"seed {seed}: target is not the point-in-time image"
            if compare(snap, src):
                pytest.fail(f"seed {seed}: the writes did not reach the source")
            for p in (src, tgt, snap):
                p.unlink()
        # a seed whose job ended before the writer did would check less: none may
        assert inside == SEEDS, f"only {inside}/{SEEDS} jobs outlasted their writer"
    finally:
        s.close()
        assert daemon.stop() == 0
