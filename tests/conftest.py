"""Fixtures shared by every test: daemons on sockets in the test's own tmp_path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from qemu.qmp import QMPClient
from support import Daemon, EventLog, connect, start_blockd, start_qsd

#: The files that take longest (from ``--durations``), started first: the two workers split
#: files whole, and a long one picked up last would run alone at the end of the suite.
LONGEST_FIRST = (
    "stress/test_kill9.py",
    "guide/test_guide.py",
    "stress/test_churn.py",
    "qcow2/test_qcow2_mutate_qmp.py",
    "qcow2/test_qcow2_crash.py",
    "bitmaps/test_persistent.py",
    "backup/test_point_in_time.py",
    "vmdk/test_vmdk_fuzz.py",
    "jobs/stream/test_stream_shell.py",
    "qmp/test_fuzz.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.as_posix()
        for i, name in enumerate(LONGEST_FIRST):
            if path.endswith(name):
                return i
        return len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture
def blockd_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(*extra: str, name: str = "blockd") -> Daemon:
        d = start_blockd(tmp_path, *extra, name=name)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def qsd_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(*extra: str, name: str = "qsd") -> Daemon:
        d = start_qsd(tmp_path, *extra, name=name)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def blockd(blockd_factory: Callable[..., Daemon]) -> Daemon:
    return blockd_factory()


@pytest.fixture
async def qmp(blockd: Daemon) -> AsyncIterator[tuple[QMPClient, EventLog]]:
    async with connect(blockd.sock) as pair:
        yield pair


@pytest.fixture(scope="module")
def shared_blockd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for a whole module (fuzzing runs thousands of cases against it)."""
    d = start_blockd(tmp_path_factory.mktemp("shared"))
    yield d
    assert d.stop() == 0
