"""Progress on a real terminal: the tool runs under ``script`` (a pty, as a user's terminal,
left unsized as on CI), and what it drew is read back from the typescript. The bar must
appear, advance through several values and end at 100 %. Without a terminal (the other tests)
the same run prints plain lines; ``--json`` gives events.
"""

from __future__ import annotations

import re
import shlex
import subprocess

from bblab import TOOL, Lab, MiB
from support import ROOT, run


def test_bar_under_a_pty(lab: Lab) -> None:
    lab.add_disk("disk0", 8 * MiB, fill=8 * MiB)
    typescript = lab.tmp / "typescript"
    cmd = shlex.join([*TOOL, *lab.backup_args("--speed", "4M")])
    run(
        "script",
        "-q",
        "-e",
        "-c",
        f"cd {shlex.quote(str(ROOT))} && {cmd}",
        typescript,
        stdin=subprocess.DEVNULL,
    )
    screen = typescript.read_text(errors="replace")
    frames = [f for f in re.split(r"[\r\n]", screen) if f.startswith("disk0")]
    pcts = [int(m.group(1)) for f in frames if (m := re.search(r"(\d+)%\|", f))]
    assert len(set(pcts)) >= 3, f"the bar did not advance: {frames}"
    assert pcts == sorted(pcts), pcts
    assert pcts[-1] == 100, frames[-3:]
    assert re.search(r"\| 8\.00M/8\.00M \[", frames[-1]), frames[-1]
    assert "point 1 done: full" in screen
