"""docs/backup-tool.md's walkthrough, run step by step as a new user would type it.

Every ``sh`` block of the document runs, in order, in one bash (``set -euo pipefail``) in a
fresh directory, with the project's virtualenv first on PATH so ``blockd-backup`` is the
console script. The ``text`` block that follows a step is what the step must print: its lines
must appear in the step's output in that order, digits standing for any number and ``…`` for
anything. A step that fails, or prints something else, fails the test with the step shown.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from support import ROOT

DOC = ROOT / "docs" / "backup-tool.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def steps(doc: str) -> list[tuple[str, str | None]]:
    """(commands, expected output or None) per ``sh`` block."""
    out: list[tuple[str, str | None]] = []
    prev = ""
    for m in FENCE.finditer(doc):
        kind, body = m.group(1), m.group(2)
        if kind == "sh":
            out.append((body, None))
        elif kind == "text" and prev == "sh":
            out[-1] = (out[-1][0], body)
        prev = kind
    return out


def line_pattern(line: str) -> re.Pattern[str]:
    parts = []
    for tok in re.split(r"(\d+(?:\.\d+)?|…)", line.rstrip()):
        if tok == "…":
            parts.append(".*")
        elif re.fullmatch(r"\d+(?:\.\d+)?", tok):
            parts.append(r"\d+(?:\.\d+)?")
        else:
            parts.append(re.escape(tok))
    return re.compile("".join(parts))


def check_output(step: int, commands: str, expected: str, got: str) -> None:
    lines = got.splitlines()
    pos = 0
    for want in expected.splitlines():
        pat = line_pattern(want)
        while pos < len(lines) and not pat.fullmatch(lines[pos].rstrip()):
            pos += 1
        assert pos < len(lines), (
            f"step {step} of {DOC.name}:\n{commands}\ndid not print (in this order):\n"
            f"  {want}\nit printed:\n{got}"
        )
        pos += 1


def test_walkthrough(tmp_path: Path) -> None:
    doc = DOC.read_text()
    todo = steps(doc)
    assert len(todo) >= 9, "the walkthrough lost steps"
    script = ["set -euo pipefail"]
    for i, (commands, _) in enumerate(todo, 1):
        script += [f"echo '@@step {i}@@'", commands]
    script.append("echo '@@end@@'")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    try:
        res = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=300,
        )
    finally:
        pidfile = tmp_path / "demo" / "qsd.pid"
        if pidfile.exists():  # the last step stops it; a failed run may not get there
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
    chunks = re.split(r"^@@step (\d+)@@\n", res.stdout, flags=re.M)
    outputs = {int(n): text for n, text in zip(chunks[1::2], chunks[2::2], strict=True)}
    ran = max(outputs, default=0)
    assert res.returncode == 0 and "@@end@@" in res.stdout, (
        f"step {ran} of {DOC.name} failed (exit {res.returncode}):\n{todo[ran - 1][0]}\n"
        f"output:\n{outputs.get(ran, res.stdout)}"
    )
    for i, (commands, expected) in enumerate(todo, 1):
        if expected is not None:
            check_output(i, commands, expected, outputs[i].replace("@@end@@\n", ""))
