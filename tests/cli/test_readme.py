"""The README's qmp-shell session, pasted into qmp-shell in one go as a new user would, works
every time against a daemon started as the README says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import ROOT, start_blockd

QMP_SHELL = str(Path(sys.executable).parent / "qmp-shell")


def readme_session() -> list[str]:
    """The ``(QEMU)`` lines of the README's first text block, in order."""
    text = (ROOT / "README.md").read_text()
    block = text.split("```text\n", 1)[1].split("```", 1)[0]
    return [ln.removeprefix("(QEMU) ") for ln in block.splitlines() if ln.startswith("(QEMU) ")]


def test_readme_qmp_shell_session_pasted_in_one_go(tmp_path: Path) -> None:
    lines = [ln.replace("/tmp/disk.img", str(tmp_path / "disk.img")) for ln in readme_session()]
    assert [ln.split()[0] for ln in lines] == [
        "blockdev-create",
        "query-jobs",
        "job-dismiss",
        "blockdev-add",
        "query-named-block-nodes",
    ]
    d = start_blockd(tmp_path)
    try:
        for _ in range(5):  # every time, not most times
            (tmp_path / "disk.img").unlink(missing_ok=True)
            res = subprocess.run(
                [QMP_SHELL, "-p", str(d.sock)],
                input="\n".join(lines) + "\n",
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert res.returncode == 0, res.stderr
            assert res.stdout.count('"return"') == len(lines), res.stdout
            assert '"error"' not in res.stdout, res.stdout
            assert '"status": "concluded"' in res.stdout
            assert '"node-name": "disk0"' in res.stdout
            res = subprocess.run(
                [QMP_SHELL, "-p", str(d.sock)],
                input="blockdev-del node-name=disk0\n",
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert '"return": {}' in res.stdout, res.stdout
    finally:
        assert d.stop() == 0
