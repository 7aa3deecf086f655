"""Crash points for the crash-safety tests.

``BLOCKD_BACKUP_CRASH_AT=NAME`` makes the process die at once (``os._exit``, no cleanup, no
flush, as ``kill -9`` would) when it reaches the step called NAME. The names are listed where
:func:`crash_point` is called; unset, a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import sys

ENV = "BLOCKD_BACKUP_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        print(f"blockd-backup: crashing at {name} ({ENV})", file=sys.stderr, flush=True)
        os._exit(99)
