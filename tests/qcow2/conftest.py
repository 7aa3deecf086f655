"""Import path of the qcow2 driver tests (qemu-img and qemu-io are installed by
scripts/test; a missing one fails the tests instead of skipping them)."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # qcow2_helpers, shared with the crash child script
