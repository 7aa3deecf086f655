"""A week of nightly backups, on blockd and on qemu-storage-daemon with the tool unchanged.

Seven runs with random writes over NBD between them. Each night a copy of the disk is taken
over NBD just before the run (nothing writes during it); afterwards every point is restored
and must equal its copy (``qemu-img compare``) and be thin. ``verify`` passes, and a byte
flipped in the data of any layer makes it fail, naming that layer, until flipped back.
"""

from __future__ import annotations

import json

import pytest
from bblab import Lab, MiB, flip_byte
from support import run


def _week(lab: Lab, nights: int, size: int = 32 * MiB, writes: int = 12) -> None:
    lab.add_disk("disk0", size)
    for night in range(1, nights + 1):
        if night > 1:
            lab.write_random("disk0", count=writes)
        lab.snapshot(night)
        res = lab.backup("--json")
        events = [json.loads(line) for line in res.stdout.splitlines()]
        result = next(e for e in events if e["event"] == "result")
        assert result["point"] == night
        assert result["level"] == ("full" if night == 1 else "inc"), result
        if night == 1:
            assert "no backup in" in result["reason"]
        progress = [e for e in events if e["event"] == "progress"]
        assert progress and progress[-1]["done"] == progress[-1]["total"], events

    points = lab.points()
    assert sorted(points) == list(range(1, nights + 1))
    # zero ranges stay holes: the full backup of a 32 MiB disk holding 2 MiB stores ~2 MiB
    if size == 32 * MiB:
        assert points[1]["disks"]["disk0"]["stored"] < 3 * MiB, points[1]
    # an incremental copies what changed, not the disk: far less than the full
    assert points[2]["disks"]["disk0"]["copied"] < points[1]["disks"]["disk0"]["copied"] / 2
    for night in range(1, nights + 1):
        lab.restore_equals(night, lab.copies[night]["disk0"])

    res = lab.tool("verify", lab.dir)
    assert f"verify ok: {nights} point(s), {nights} layer(s)" in res.stdout

    chain = lab.dir / "chain-0001"
    for night in range(1, nights + 1):
        layer = chain / f"disk0.{night:04d}.qcow2"
        flip_byte(layer)
        bad = lab.tool("verify", lab.dir, "--point", str(nights), ok=False)
        assert bad.returncode == 3, bad.stderr + bad.stdout
        assert f"{layer}: 1 chunk(s) differ" in bad.stderr, bad.stderr
        if night == 4:  # points below the damaged layer do not need it and still verify
            lab.tool("verify", lab.dir, "--point", "3")
        flip_byte(layer)
    lab.tool("verify", lab.dir)


def test_week(lab: Lab) -> None:
    _week(lab, 7)


@pytest.mark.slow
def test_two_weeks_bigger_disk(lab: Lab) -> None:
    _week(lab, 14, size=256 * MiB, writes=60)


def test_compressed_layers(lab: Lab) -> None:
    """--compress: the layers hold compressed clusters, which the hashing decompresses."""
    lab.add_disk("disk0", 8 * MiB)
    lab.night(1, "--compress", write=False)
    assert "point 2 done: inc" in lab.night(2, "--compress")
    layer = lab.dir / "chain-0001" / "disk0.0001.qcow2"
    info = json.loads(run("qemu-img", "check", "--output=json", layer).stdout)
    assert info["compressed-clusters"] > 0, info
    for point in (1, 2):
        lab.restore_equals(point, lab.copies[point]["disk0"])
    lab.tool("verify", lab.dir)
