"""A throwaway OpenSSH server and client identity for the ssh driver's tests and benchmark.

Nothing here reads or writes the real ``~/.ssh``. Both blockd and qemu-storage-daemon (libssh)
find ``~/.ssh`` through the passwd entry of the user they run as, not ``$HOME``; so the daemons
under test (and sshd) run with nss_wrapper (``LD_PRELOAD=libnss_wrapper.so``), which answers
passwd lookups from a file in the lab directory: the current user's entry points its home at
``DIR/home``. ``$HOME`` is set to a decoy directory whose ``.ssh`` holds a known_hosts that
would refuse the server, so a daemon that looked at ``$HOME`` would fail the tests.

sshd runs as the current user (root in CI) in the foreground on 127.0.0.1 at a free port, with
its own config: host keys of three types, per-user authorized_keys files in the lab directory,
no PAM, no user rc files, and ``MaxStartups`` high enough that qemu-storage-daemon's leaked
connections do not make it drop new ones.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

NSS_WRAPPER = "libnss_wrapper.so"
HOST_KEY_TYPES = ("ed25519", "ecdsa", "rsa")
#: A user that exists (in the wrapped passwd) but has no authorized key.
OTHER_USER = "blockd-other"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path, kind: str) -> None:
    extra = ["-b", "2048"] if kind == "rsa" else []
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", "", "-f", str(path)], check=True
    )


def key_blob(pub: Path) -> tuple[str, bytes]:
    kind, b64 = pub.read_text().split()[:2]
    return kind, base64.b64decode(b64)


class SshLab:
    """A running sshd plus the client-side files the daemons under test use."""

    def __init__(self, root: Path, sftp: str = "internal-sftp") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.home = root / "home"
        self.sshdir = self.home / ".ssh"
        self.decoy = root / "decoy-home"
        self.data = root / "data"
        for d in (self.sshdir, self.decoy / ".ssh", self.data, root / "auth"):
            d.mkdir(parents=True, exist_ok=True)
        me = pwd.getpwuid(os.getuid())
        self.user = me.pw_name
        self.host_keys = {k: root / f"host_{k}" for k in HOST_KEY_TYPES}
        for kind, path in self.host_keys.items():
            if not path.exists():
                _keygen(path, kind)
        self.client_key = self.sshdir / "id_ed25519"
        if not self.client_key.exists():
            _keygen(self.client_key, "ed25519")
        (root / "auth" / self.user).write_text(Path(f"{self.client_key}.pub").read_text())
        self.passwd = root / "passwd"
        self.passwd.write_text(
            f"{me.pw_name}:x:{me.pw_uid}:{me.pw_gid}:blockd test:{self.home}:/bin/sh\n"
            f"{OTHER_USER}:x:65533:65533::{root / 'other-home'}:/bin/sh\n"
            "sshd:x:65534:65534:privsep:/run/sshd:/usr/sbin/nologin\n"
        )
        self.group = root / "group"
        self.group.write_text(f"g{me.pw_gid}:x:{me.pw_gid}:\nnogroup:x:65534:\n")
        (self.decoy / ".ssh" / "known_hosts").write_text(
            "# decoy: blockd must not read $HOME\n*"
            + " ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"
            + "A" * 43
            + "\n"
        )
        self.port = free_port()
        self.sftp = sftp
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()
        self.write_known_hosts(self.known_hosts_lines())

    # -- the server ------------------------------------------------------------------------
    def start(self) -> None:
        # sshd refuses to start without its privilege separation directory (created by the
        # distribution's service unit, which nobody runs here).
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        cfg = self.root / "sshd_config"
        lines = [
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            *(f"HostKey {p}" for p in self.host_keys.values()),
            f"PidFile {self.root / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.root / 'auth'}/%u",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitUserRC no",
            "MaxStartups 1000:30:1000",
            "LogLevel VERBOSE",
            f"Subsystem sftp {self.sftp}",
        ]
        cfg.write_text("\n".join(lines) + "\n")
        log = open(self.root / "sshd.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sshd exited: {(self.root / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        raise AssertionError("sshd did not start listening")

    def stop(self) -> None:
        self.kill_sessions()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def session_pids(self) -> list[int]:
        """Processes sshd forked for connections (pre-auth and session), all descendants."""
        if self.proc is None:
            return []
        out: list[int] = []
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            out += [int(k) for k in kids]
            todo += [int(k) for k in kids]
        return out

    def kill_sessions(self) -> int:
        """Drop every connection at the server side (the listener stays)."""
        pids = self.session_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    # -- the client side -------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a process that must see the wrapped passwd (and not the agent)."""
        env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
        env.update(
            LD_PRELOAD=NSS_WRAPPER,
            NSS_WRAPPER_PASSWD=str(self.passwd),
            NSS_WRAPPER_GROUP=str(self.group),
            HOME=str(self.decoy),
        )
        env.update(extra)
        return env

    def host_pub(self, kind: str) -> Path:
        return Path(f"{self.host_keys[kind]}.pub")

    def known_line(self, kind: str, name: str | None = None, pub: Path | None = None) -> str:
        key = (pub or self.host_pub(kind)).read_text().split()[:2]
        return f"{name or f'[127.0.0.1]:{self.port}'} {key[0]} {key[1]}"

    def known_hosts_lines(self, kinds: tuple[str, ...] = HOST_KEY_TYPES) -> list[str]:
        return [self.known_line(k) for k in kinds]

    def write_known_hosts(self, lines: list[str]) -> None:
        (self.sshdir / "known_hosts").write_text("".join(f"{line}\n" for line in lines))

    def digest(self, kind: str, hash_type: str) -> str:
        return hashlib.new(hash_type, key_blob(self.host_pub(kind))[1]).hexdigest()

    def server(self, port: str | None = None) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": str(self.port) if port is None else port}

    def node(self, name: str, path: Path | str, **extra: Any) -> dict[str, Any]:
        """blockdev-add arguments of an ssh node for *path* on this server."""
        return {
            "driver": "ssh",
            "node-name": name,
            "server": self.server(),
            "path": str(path),
            **extra,
        }


def connections(pid: int, port: int) -> int:
    """Established TCP connections process *pid* holds to 127.0.0.1:*port*."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                count += 1
    return count
