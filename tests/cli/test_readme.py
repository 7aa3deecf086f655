"""The README as a new user follows it: on a fresh clone with no ``.venv``,
``./scripts/blockd`` creates the venv and then does what was asked, on the very first run; and
the README's qmp-shell session, pasted in one go, works every time.

The full check (marked slow: ``./scripts/test -m slow``) clones the repository and lets
``scripts/blockd`` build a real venv (pip with the machine's cache and local index, 20-55 s);
the default run keeps a cheap check of the same shell function, ``ensure_venv``, against a
stand-in venv whose stamp is missing or stale, the branch a first run takes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, connect, run, start_blockd, wait_for_socket

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


def _fake_root(tmp: Path) -> Path:
    """A project root with the real venv.sh and pyproject.toml, and a venv whose python only
    records how it was called (so ``pip install`` is instant)."""
    root = tmp / "proj"
    (root / "scripts" / "lib").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "lib" / "venv.sh", root / "scripts" / "lib" / "venv.sh")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    bindir = root / ".venv" / "bin"
    bindir.mkdir(parents=True)
    py = bindir / "python"
    py.write_text(f'#!/bin/sh\necho "$@" >> {tmp / "pip-calls"}\n')
    py.chmod(0o755)
    return root


def _ensure_venv(root: Path, extras: str) -> subprocess.CompletedProcess[str]:
    # The same shell options as scripts/blockd: a failing last command must not go unnoticed.
    script = f'set -euo pipefail; . scripts/lib/venv.sh; ensure_venv "{extras}"; echo reached'
    return subprocess.run(
        ["bash", "-c", script], cwd=root, capture_output=True, text=True, timeout=60
    )


def test_ensure_venv_first_run_without_extras_returns_to_the_script(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    calls = tmp_path / "pip-calls"
    stamp = root / ".venv" / ".blockd-stamp"
    for extras in ("", "[test]"):
        stamp.write_text("stale\n")  # pyproject.toml changed since the last install
        res = _ensure_venv(root, extras)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "reached", res
    assert calls.read_text().splitlines() == [
        f"-m pip install -q --disable-pip-version-check -e {root}",
        f"-m pip install -q --disable-pip-version-check -e {root}[test]",
    ]
    # The [test] stamp serves plain runs too: neither reinstalls now.
    for extras in ("", "[test]"):
        res = _ensure_venv(root, extras)
        assert res.returncode == 0 and res.stdout.strip() == "reached", res
    assert len(calls.read_text().splitlines()) == 2


async def _query_version(sock: Path) -> dict[str, object]:
    async with connect(sock) as (client, _events):
        return dict(await client.execute("query-version"))


@pytest.mark.slow  # 20-55 s of pip on 2 busy cores; the default run keeps the ensure_venv check
def test_fresh_clone_help_then_daemon_answers_qmp(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    run("git", "clone", "-q", ROOT, clone)
    assert not (clone / ".venv").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    res = subprocess.run(
        [clone / "scripts" / "blockd", "--help"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("usage: blockd"), res.stdout
    assert (clone / ".venv" / "bin" / "blockd").exists()

    sock = tmp_path / "b.sock"
    log = tmp_path / "b.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [clone / "scripts" / "blockd", "--socket", sock],
            cwd=clone,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_socket(sock, proc, timeout=60)
        version = asyncio.run(_query_version(sock))
        assert str(version["package"]).startswith("blockd "), version
        # The README's session, with the qmp-shell the first run installed.
        lines = [ln.replace("/tmp/disk.img", str(tmp_path / "disk.img")) for ln in readme_session()]
        res = subprocess.run(
            [clone / ".venv" / "bin" / "qmp-shell", "-p", sock],
            input="\n".join(lines) + "\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.stdout.count('"return"') == len(lines) and '"error"' not in res.stdout, res
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
