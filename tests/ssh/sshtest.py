"""Helpers of the ssh driver tests that test modules import (conftest cannot be imported under
pytest's importlib mode): daemon pairs started with the lab's passwd entry, and the reset of the
client files between tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from diffsupport import Session
from sshlab import SshLab
from support import Daemon, start_blockd, start_qsd


def reset_client_files(lab: SshLab) -> None:
    """All host keys known, no ssh config, the identity in place (tests move it away)."""
    kh = lab.sshdir / "known_hosts"
    if kh.is_dir():
        kh.rmdir()
    lab.write_known_hosts(lab.known_hosts_lines())
    (lab.sshdir / "config").unlink(missing_ok=True)
    moved = lab.sshdir / "mykey"
    if moved.exists():
        for suffix in ("", ".pub"):
            os.rename(f"{moved}{suffix}", f"{lab.client_key}{suffix}")


@dataclass
class Pair:
    """blockd and QSD started with the lab's passwd entry, each with a negotiated session."""

    daemons: dict[str, Daemon]
    sessions: dict[str, Session]


@contextlib.contextmanager
def started_pair(lab: SshLab, tmp: Path, **env: str) -> Iterator[Pair]:
    daemons = {
        "blockd": start_blockd(tmp, env=lab.env(**env)),
        "qsd": start_qsd(tmp, env=lab.env(**env)),
    }
    sessions = {k: Session(d.sock) for k, d in daemons.items()}
    try:
        yield Pair(daemons, sessions)
    finally:
        for s in sessions.values():
            s.close()
        daemons["qsd"].stop()
        assert daemons["blockd"].stop() == 0, daemons["blockd"].log_text()[-3000:]
