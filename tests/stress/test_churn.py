"""Sixteen and more clients churning the daemon at once, checked against a shadow record.

Each client has its own QMP connection and NBD connections; together they add and delete
nodes, add/remove/clear/merge dirty bitmaps (persistent or not), run backups (blockdev-backup
and drive-backup, sync full/top/bitmap/none, every bitmap mode) and cancel some, add and
delete exports, and write over NBD and with qemu-io on shared and on their own nodes. At the
end: no internal error in any answer or in the log, no node or export left, the daemon's fds
back to their count before the run, ``qemu-img check`` clean on every image, every bitmap
exact (never missing a written range; more only by granularity rounding), every unit of data
as last written, every finished backup a point-in-time copy.

``BLOCKD_STRESS_SEED`` replays a seed (the failure message names it); the slow variant runs
``BLOCKD_STRESS_SECONDS`` (default 300) with a fresh seed.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from churn.world import World
from support import Daemon

#: The default run's seed, so that the suite is repeatable; the slow variant draws one.
DEFAULT_SEED = 9


def seed_from_env(default: int | None) -> int:
    value = os.environ.get("BLOCKD_STRESS_SEED")
    if value:
        return int(value)
    return default if default is not None else random.randrange(1 << 32)


async def churn(tmp_path: Path, daemon: Daemon, seed: int, seconds: float) -> None:
    world = World(tmp_path, daemon, seed, seconds=seconds)
    await world.setup()
    await world.run()
    problems = [*world.internal, *world.anomalies]
    if not world.anomalies:
        problems += await world.finish()
    print(world.summary())
    assert not problems, f"{world.summary()}\nreplay: BLOCKD_STRESS_SEED={seed}\n" + "\n".join(
        problems[:40]
    )


async def test_churn(tmp_path: Path, blockd_factory: Callable[..., Daemon]) -> None:
    daemon = blockd_factory("--log-level", "info")
    await churn(tmp_path, daemon, seed_from_env(DEFAULT_SEED), 20)


@pytest.mark.slow
async def test_churn_long(tmp_path: Path, blockd_factory: Callable[..., Daemon]) -> None:
    daemon = blockd_factory("--log-level", "info")
    seconds = float(os.environ.get("BLOCKD_STRESS_SECONDS", "300"))
    await churn(tmp_path, daemon, seed_from_env(None), seconds)
