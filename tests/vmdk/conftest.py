"""vmdk test fixtures: one blockd and one qemu-storage-daemon for all vmdk tests, each with an
NBD server, so that every image is opened, exported and read by both in the same run.

The helper modules next to this file (and tests/nbd's nbdtest) are made importable here,
since pytest's importlib mode does not put test folders on sys.path."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent / "nbd"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from vmdktest import Pair  # noqa: E402


@pytest.fixture(scope="package")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    p = Pair(tmp_path_factory.mktemp("daemons"))
    try:
        yield p
    finally:
        p.close()
