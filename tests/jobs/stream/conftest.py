"""Import path of the stream tests: streamload, the guest workload shared with
scripts/stream_guest.py."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
