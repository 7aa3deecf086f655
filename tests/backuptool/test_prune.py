"""``prune``: the oldest points go, the kept ones keep their numbers and restore exactly as
before, and an interrupted prune never costs a kept point.

Two chains (points 1-3, then a forced full starting points 4-6). ``--keep 2`` deletes the
first chain whole and merges point 5 into the second chain's base. The prune is then
interrupted at each of its steps (the process dies there, as with ``kill -9``): every kept
point must still restore identically, and the next prune must finish the job.
"""

from __future__ import annotations

import shutil

import pytest
from bblab import Lab, MiB

from blockd.tools.backup import lock
from blockd.tools.backup.testhooks import ENV

STEPS = [
    "prune-sums-written",
    "prune-journal-written",
    "prune-committed",
    "prune-rebased",
    "prune-switched",
]


def _six_points(lab: Lab) -> None:
    lab.add_disk("disk0", 16 * MiB)
    for night in range(1, 7):
        lab.night(night, *(["--level", "full"] if night == 4 else []), write=night > 1)


def _kept_points_restore(lab: Lab, kept: list[int]) -> None:
    assert sorted(lab.points()) == kept
    for point in kept:
        lab.restore_equals(point, lab.copies[point]["disk0"])


def test_prune_keeps_numbers_and_content(lab: Lab) -> None:
    _six_points(lab)
    res = lab.tool("prune", lab.dir, "--keep", "2")
    assert "pruned point(s) 1, 2, 3, 4; kept 2 from point 5" in res.stdout
    assert not (lab.dir / "chain-0001").exists()
    chain = lab.dir / "chain-0004"
    assert sorted(p.name for p in chain.glob("*.qcow2")) == ["disk0.0004.qcow2", "disk0.0006.qcow2"]
    pts = lab.points()
    assert pts[5]["merged"] == [4] and pts[5]["level"] == "full"
    _kept_points_restore(lab, [5, 6])
    lab.tool("verify", lab.dir)
    # the chain goes on: the next incremental builds on point 6, numbering continues
    assert "point 7 done: inc" in lab.night(7)
    _kept_points_restore(lab, [5, 6, 7])
    assert "nothing to prune" in lab.tool("prune", lab.dir, "--keep", "3").stdout


#: Prune works on files only; the backups it merges come from either daemon, so the long
#: crash-point walk runs on blockd-made chains by default and on QSD-made ones with -m slow.
ONE_KIND = pytest.mark.parametrize(
    "lab", ["blockd", pytest.param("qsd", marks=pytest.mark.slow)], indirect=True
)


@ONE_KIND
def test_interrupted_prune(lab: Lab) -> None:
    """One chain set, pruned from a fresh copy of the directory for each step it can die at.
    After the last step a backup runs before the prune is finished."""
    _six_points(lab)
    pristine = lab.tmp / "pristine"
    shutil.copytree(lab.dir, pristine)
    for step in STEPS:
        shutil.rmtree(lab.dir)
        shutil.copytree(pristine, lab.dir)
        crashed = lab.tool("prune", lab.dir, "--keep", "2", ok=False, process=True, env={ENV: step})
        assert crashed.returncode == 99, crashed.stderr
        # the first chain goes before the merge starts; point 4 when the journal is written
        kept = [4, 5, 6] if step == "prune-sums-written" else [5, 6]
        _kept_points_restore(lab, kept)
        if step != "prune-sums-written":
            assert "prune unfinished" in lab.tool("list", lab.dir).stdout
            refused = lab.tool("verify", lab.dir, ok=False)
            assert refused.returncode == 1
            assert "was interrupted; run 'blockd-backup prune" in refused.stderr
        if step == STEPS[-1]:
            # backups go on meanwhile
            lab.night(7)
        final = [5, 6, 7] if step == STEPS[-1] else [5, 6]
        res = lab.tool("prune", lab.dir, "--keep", str(len(final)))
        if step == "prune-sums-written":
            assert "kept 2 from point 5" in res.stdout, res.stdout
        else:
            assert "finishing the prune of chain-0004 that was interrupted" in res.stderr
            assert "nothing to prune" in res.stdout
        # verify re-reads every layer and checks every kept point's digest
        assert sorted(lab.points()) == final
        lab.tool("verify", lab.dir)
        left = sorted(p.name for p in (lab.dir / "chain-0004").iterdir())
        assert left[:5] == [
            "disk0.0004-0005.sums",
            "disk0.0004.qcow2",
            "disk0.0006.qcow2",
            "disk0.0006.sums",
            "disk0.0007.qcow2" if step == STEPS[-1] else "manifest.json",
        ], (step, left)
    lab.restore_equals(7, lab.copies[7]["disk0"])


@ONE_KIND
def test_prune_waits_for_no_reader(lab: Lab) -> None:
    lab.add_disk("disk0", 8 * MiB)
    lab.backup()
    lab.backup()
    with lock.readers(lab.dir):
        busy = lab.tool("prune", lab.dir, "--keep", "1", ok=False)
    assert busy.returncode == 4
    assert "is in use by a prune, restore or serve" in busy.stderr, busy.stderr
    lab.tool("prune", lab.dir, "--keep", "1")
