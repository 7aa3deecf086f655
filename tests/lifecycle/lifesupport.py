"""Helpers of the process lifecycle tests: run a daemon's command line to its end, and read
back what a daemon left in an image."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from support import ROOT, qemu_img


def run_blockd(*args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``blockd ARGS`` to its end (the cases here fail at start)."""
    return subprocess.run(
        [sys.executable, "-m", "blockd", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def run_qsd(*args: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-storage-daemon", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def qsd_monitor_args(sock: Path) -> list[str]:
    return ["--chardev", f"socket,path={sock},server=on,wait=off,id=m", "--monitor", "chardev=m"]


#: blockd's log lines (its stderr also carries them); anything else is a message or a crash.
_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ blockd (DEBUG|INFO|WARNING|ERROR) ")


def lines(text: str) -> list[str]:
    """The non-empty lines of *text* that are not blockd log lines."""
    return [ln for ln in text.splitlines() if ln.strip() and not _LOG_LINE.match(ln)]


def image_bitmaps(path: Path) -> list[dict[str, Any]]:
    info = json.loads(qemu_img("info", "-U", "--output=json", path).stdout)
    return list(info["format-specific"]["data"].get("bitmaps", []))
