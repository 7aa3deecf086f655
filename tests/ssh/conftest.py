"""Fixtures of the ssh driver tests: one throwaway sshd for the session (see sshlab), and
blockd and qemu-storage-daemon started with the lab's wrapped passwd entry."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sshlab, sshtest

from sshlab import SshLab
from sshtest import Pair, reset_client_files, started_pair


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshLab]:
    server = SshLab(tmp_path_factory.mktemp("sshlab"))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def client_files(lab: SshLab) -> Iterator[SshLab]:
    reset_client_files(lab)
    yield lab
    reset_client_files(lab)


@pytest.fixture(scope="module")
def pair(lab: SshLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with started_pair(lab, tmp_path_factory.mktemp("pair")) as p:
        yield p
