"""Fixtures and import path of the qcow2 driver tests (they need qemu-img and qemu-io)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # qcow2_helpers, shared with the crash child script


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if shutil.which("qemu-img") and shutil.which("qemu-io"):
        return
    skip = pytest.mark.skip(reason="qemu-img/qemu-io not installed")
    for item in items:
        if "tests/qcow2" in str(item.fspath):
            item.add_marker(skip)
