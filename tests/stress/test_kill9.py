"""``kill -9`` of the daemon at a random moment of the churn, then the images as any QEMU
would find them: ``qemu-img check`` sees no corruption (leaked clusters are tolerated), no
persistent bitmap is consistent but wrong (one without the in-use flag holds every range
written before, as the shadow record of answered writes says), and every unit of data holds
what was last written before a flush, or something written after it. Then a new daemon opens
every image: the bitmaps flagged in use show as inconsistent and can be removed, the others
as consistent, and closing leaves none in use.

The default run kills 8 churns within 3 s of their start (about 40 s); the slow variant kills
``BLOCKD_STRESS_KILLS`` (default 20) anywhere in their first 10 s. ``BLOCKD_STRESS_SEED``
replays a seed (with ``BLOCKD_STRESS_KILLS=1`` one run); each run's seed is the seed plus
its number.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from churn.checks import bad_log_lines
from churn.world import World
from support import start_blockd

DEFAULT_SEED = 90


async def kill_runs(tmp_path: Path, seed: int, runs: int, latest: float) -> None:
    """*runs* churns, each killed between 1.5 s and *latest* s after it began."""
    failures = []
    for i in range(runs):
        run_seed = seed + i
        tmp = tmp_path / f"run{i}"
        tmp.mkdir()
        daemon = start_blockd(tmp, "--log-level", "info")
        kill_after = random.Random(run_seed).uniform(1.5, latest)
        world = World(tmp, daemon, run_seed, seconds=60, kill_after=kill_after)
        try:
            await world.setup()
            await world.run()
            problems = [*world.internal, *world.anomalies, *await world.after_kill()]
            problems += bad_log_lines(daemon.log_text())
        finally:
            daemon.stop()
        print(f"kill after {kill_after:.1f}s, {world.summary()}")
        if problems:
            replay = f"replay: BLOCKD_STRESS_SEED={run_seed} BLOCKD_STRESS_KILLS=1"
            failures.append(
                f"{world.summary()}, killed after {kill_after:.1f}s\n{replay}\n"
                + "\n".join(problems[:20])
            )
    assert not failures, "\n\n".join(failures)


def _seed(default: int | None) -> int:
    value = os.environ.get("BLOCKD_STRESS_SEED")
    if value:
        return int(value)
    return default if default is not None else random.randrange(1 << 32)


def _runs(default: int) -> int:
    return int(os.environ.get("BLOCKD_STRESS_KILLS", default))


async def test_kill9_during_churn(tmp_path: Path) -> None:
    await kill_runs(tmp_path, _seed(DEFAULT_SEED), _runs(8), 3.0)


@pytest.mark.slow
async def test_kill9_during_churn_many(tmp_path: Path) -> None:
    await kill_runs(tmp_path, _seed(None), _runs(20), 10.0)
