"""docs/stream.md replayed as written: QEMU's live-block-operations stream examples typed into
a real qmp-shell against a real blockd, with a guest writing over NBD, every reply, event and
qemu-img result checked against the page (rules in tests/guide/transcripts.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from support import ROOT

sys.path.insert(0, str(ROOT / "tests" / "guide"))
from transcripts import Replay, sessions

DOC = ROOT / "docs" / "stream.md"


def test_stream_walkthrough(tmp_path: Path) -> None:
    steps = [s for block in sessions(DOC.read_text(), "docs/stream.md") for s in block]
    typed = [f"{s.prompt} {s.command}" for s in steps]
    for example in (
        "(QEMU) block-stream device=node-C base-node=node-A job-id=job0",
        "(QEMU) block-stream device=node-D base-node=node-A job-id=job1",
        "(QEMU) block-stream device=node-D job-id=job2",
    ):
        assert example in typed, f"docs/stream.md no longer shows {example}"
    replay = Replay(ROOT, tmp_path)
    try:
        replay.play(steps)
    finally:
        unclean = replay.close()
    assert not unclean, f"daemons that did not stop cleanly: {unclean}"
