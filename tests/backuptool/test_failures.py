"""What goes wrong between and during runs, on blockd and on qemu-storage-daemon: the daemon
killed with SIGKILL in the middle of a run, a disk resized between runs, the chain's bitmap
removed by hand, the backup disk filling up during a run. Each time the failed run leaves the
chain as it was (and no partial file), the next ``auto`` run takes a full backup by itself and
says why, and every point restores to the disk as it was at that point.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bblab import Lab, MiB
from support import qemu_img, run


def _full_reason(res: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in res.stderr.splitlines() if ": full backup: " in line]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_daemon_killed_during_run_4(lab: Lab) -> None:
    lab.add_disk("disk0", 32 * MiB)
    for night in (1, 2, 3):
        lab.night(night, write=night > 1)
    before = lab.files()
    lab.write_random("disk0", count=6)
    # run 4, throttled so that it is still copying when the daemon dies
    proc, _ = lab.start_tool(*lab.backup_args("--json", "--speed", "256K"), until="started")
    lab.kill9()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err + out
    error = json.loads(out.splitlines()[-1])
    assert error["event"] == "error"
    assert "point 4 failed: the daemon went away" in error["message"], error
    assert lab.files() == before, "the failed run left files behind"

    lab.start()  # the daemon comes back with the same disk image
    lab.write_random("disk0")
    lab.snapshot(4)  # run 5: the failed run took no number, so this is point 4
    res = lab.backup()
    assert "previous run failed" in _full_reason(res), res.stderr
    assert "point 4 done: full" in res.stdout
    for point in (1, 2, 3, 4):
        lab.restore_equals(point, lab.copies[point]["disk0"])
    lab.tool("verify", lab.dir)


def test_bitmap_removed_then_disk_resized(lab: Lab) -> None:
    """Points 1-2 full and incremental; the bitmap removed by hand: point 3 full (an explicit
    incremental is refused, saying why), point 4 incremental again; the disk grown between
    runs: point 5 full, point 6 incremental on the new size."""
    lab.add_disk("disk0", 16 * MiB)
    lab.night(1, write=False)
    lab.night(2)
    bitmap = lab.points()[2]["disks"]["disk0"]["bitmap"]
    lab.qmp("block-dirty-bitmap-remove", {"node": "disk0", "name": bitmap})
    lab.write_random("disk0")
    lab.snapshot(3)
    refused = lab.backup("--level", "inc", ok=False)
    assert refused.returncode == 1
    assert f"cannot take an incremental backup: bitmap {bitmap} is missing on disk0" in (
        refused.stderr
    )
    res = lab.backup()
    assert f"bitmap {bitmap} is missing on disk0" in _full_reason(res)
    assert "point 4 done: inc" in lab.night(4)

    lab.detach("disk0")
    qemu_img("resize", "-q", "-f", "qcow2", lab.disks["disk0"], "24M")
    lab.attach("disk0")
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x77 {20 * MiB} 64k", lab.uri("disk0"))
    lab.write_random("disk0")
    lab.snapshot(5)
    res = lab.backup()
    assert "disk0 changed size (16.0 MiB -> 24.0 MiB)" in _full_reason(res)
    assert "point 6 done: inc" in lab.night(6)
    for point in range(1, 7):
        lab.restore_equals(point, lab.copies[point]["disk0"])
    assert os.path.getsize(lab.tmp / "restore-4-d.raw") == 16 * MiB
    assert os.path.getsize(lab.tmp / "restore-6-d.raw") == 24 * MiB
    lab.tool("verify", lab.dir)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs for the backup directory (the tests run as root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", mnt)
    try:
        yield mnt
    finally:
        run("umount", "-l", mnt, check=False)


def test_backup_disk_fills_up_during_a_run(lab: Lab, small_fs: Path) -> None:
    lab.dir = small_fs / "backups"
    lab.add_disk("disk0", 32 * MiB, fill=4 * MiB)
    lab.snapshot(1)
    lab.backup()
    before = lab.files()
    # 16 MiB of new data cannot fit in the 8 MiB left
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x33 {8 * MiB} {16 * MiB}", lab.uri("disk0"))
    failed = lab.backup(ok=False)
    assert failed.returncode == 1
    assert "point 2 failed: the backup of disk0 failed: No space left on device" in failed.stderr
    assert lab.files() == before, "the failed run left files behind"
    lab.restore_equals(1, lab.copies[1]["disk0"])
    lab.tool("verify", lab.dir)

    run("mount", "-o", "remount,size=64m", small_fs)
    lab.snapshot(2)
    res = lab.backup()
    assert "previous run failed (the backup of disk0 failed: No space left" in _full_reason(res)
    assert "point 3 done: inc" in lab.night(3)
    for point in (1, 2, 3):
        lab.restore_equals(point, lab.copies[point]["disk0"])
    lab.tool("verify", lab.dir)
