"""The README's first command, as a new user runs it: on a fresh clone with no ``.venv``,
``./scripts/blockd`` must create the venv and then do what was asked, on the very first run.

The full check clones the repository and lets ``scripts/blockd`` build a real venv (pip uses
the machine's wheel cache and local index, about 20 s); the cheap check drives the same shell
function, ``ensure_venv``, against a stand-in venv whose stamp is missing or stale, which is the
branch a first run takes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from pathlib import Path

from support import ROOT, connect, run, wait_for_socket


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
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
