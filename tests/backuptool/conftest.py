"""Fixtures of the blockd-backup tests; the lab itself is bblab.py (made importable here,
since pytest's importlib mode does not put test folders on sys.path)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bblab import KINDS, Lab


@pytest.fixture(params=KINDS)
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path, request.param)
    lab.start()
    try:
        yield lab
    finally:
        if lab.daemon is not None:
            lab.daemon.stop()
