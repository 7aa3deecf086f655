"""Mirror and commit tests. The helper modules next to this file are made importable here
because pytest's importlib mode does not put test folders on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
