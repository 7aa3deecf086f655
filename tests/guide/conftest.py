"""Import path of the guide tests: pytest's importlib mode does not put test folders on
sys.path, and transcripts.py lives next to them."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
