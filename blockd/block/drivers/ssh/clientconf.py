"""What the ssh client takes from the local user's files, found the way libssh finds them for
qemu-storage-daemon.

The home directory is the passwd entry's, not ``$HOME`` (libssh and OpenSSH both ask
``getpwuid``); asyncssh's own defaults would follow ``$HOME``, so none of them is used and every
path is passed explicitly. Of ``~/.ssh/config`` (then ``/etc/ssh/ssh_config``) the keywords that
change what QEMU does are honoured: ``IdentityFile``, ``StrictHostKeyChecking``,
``UserKnownHostsFile``, ``GlobalKnownHostsFile``, and ``HostName``/``Port``, which in QEMU only
change the name looked up in known_hosts because QEMU hands libssh an already connected socket.
``Host`` blocks, ``Match all`` and ``Include`` are followed; other ``Match`` criteria make a
block not apply.

Everything here does file and passwd lookups, so :func:`load` runs in the I/O pool.
"""

from __future__ import annotations

import glob
import os
import pwd
import shlex
from dataclasses import dataclass, field

import asyncssh

from blockd.block.drivers.ssh.hostkey import (
    KnownKey,
    lookup_name,
    parse_known_hosts,
    wildcard_match,
)

GLOBAL_CONFIG = "/etc/ssh/ssh_config"
GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
#: libssh 0.10's default identities, tried after the agent's keys.
DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
_KEYWORDS = {
    "identityfile",
    "stricthostkeychecking",
    "userknownhostsfile",
    "globalknownhostsfile",
    "hostname",
    "port",
}


@dataclass
class ClientSetup:
    """The local side of one connection, read before connecting."""

    user: str
    known: list[KnownKey] = field(default_factory=list)
    strict: bool = True
    keys: list[asyncssh.SSHKey] = field(default_factory=list)


def passwd_entry() -> pwd.struct_passwd:
    return pwd.getpwuid(os.getuid())


class _Config:
    """The ssh_config subset above, first value wins (IdentityFile accumulates)."""

    def __init__(self, host: str, home: str, sshdir: str) -> None:
        self.host = host
        self.home = home
        self.sshdir = sshdir
        self.values: dict[str, str] = {}
        self.identities: list[str] = []

    def read(self, path: str, base: str, depth: int = 0) -> None:
        """Apply the file at *path*; relative ``Include``s are found in *base* (``~/.ssh`` for
        the user's file, ``/etc/ssh`` for the system's, as OpenSSH and libssh do)."""
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return  # a missing or unreadable config is no config, as for libssh
        applies = True
        for raw in lines:
            words = _split(raw)
            if not words:
                continue
            key, args = words[0].lower(), words[1:]
            if key == "host":
                applies = _host_applies(args, self.host)
            elif key == "match":
                applies = [a.lower() for a in args] == ["all"]
            elif not applies or not args:
                continue
            elif key == "include" and depth < 8:
                for pattern in args:
                    full = os.path.join(base, _expand(pattern, self.home, self.sshdir, {}))
                    for inc in sorted(glob.glob(full)):
                        self.read(inc, base, depth + 1)
            elif key == "identityfile":
                self.identities.append(args[0])
            elif key in _KEYWORDS:
                self.values.setdefault(key, args[0])


def _split(line: str) -> list[str]:
    line = line.strip()
    if not line or line.startswith("#"):
        return []
    if "=" in line.split(None, 1)[0]:
        key, _, rest = line.partition("=")
        line = f"{key} {rest}"
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return []


def _host_applies(patterns: list[str], host: str) -> bool:
    matched = False
    for pat in patterns:
        if pat.startswith("!"):
            if wildcard_match(pat[1:], host):
                return False
        elif wildcard_match(pat, host):
            matched = True
    return matched


def _expand(path: str, home: str, sshdir: str, tokens: dict[str, str]) -> str:
    """libssh's path escapes: ``~`` is the home directory, ``%d`` the ssh directory."""
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    out = []
    i = 0
    while i < len(path):
        c = path[i]
        if c == "%" and i + 1 < len(path):
            nxt = path[i + 1]
            out.append(sshdir if nxt == "d" else tokens.get(nxt, "%" if nxt == "%" else c + nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""  # missing, a directory, unreadable: no entries, as libssh reports it


def _load_key(path: str) -> asyncssh.SSHKey | None:
    try:
        return asyncssh.read_private_key(path)
    except (OSError, ValueError, asyncssh.KeyImportError):
        return None  # absent, or encrypted (QEMU gives libssh no passphrase prompt)


def load(user: str | None, host: str, port: int) -> ClientSetup:
    """Read the local user's ssh files for a connection to *host*:*port*. Blocking."""
    entry = passwd_entry()
    home = entry.pw_dir
    sshdir = os.path.join(home, ".ssh")
    remote_user = user if user is not None else entry.pw_name
    conf = _Config(host.lower(), home, sshdir)
    conf.read(os.path.join(sshdir, "config"), sshdir)
    conf.read(GLOBAL_CONFIG, os.path.dirname(GLOBAL_CONFIG))
    v = conf.values
    lookup_host = v.get("hostname", host)
    try:
        lookup_port = int(v["port"]) if "port" in v else port
    except ValueError:
        lookup_port = port
    tokens = {
        "h": lookup_host,
        "p": str(lookup_port),
        "r": remote_user,
        "u": entry.pw_name,
    }
    setup = ClientSetup(user=remote_user)
    setup.strict = v.get("stricthostkeychecking", "yes").lower() not in ("no", "off", "false")
    user_kh = _expand(v.get("userknownhostsfile", "%d/known_hosts"), home, sshdir, tokens)
    global_kh = _expand(v.get("globalknownhostsfile", GLOBAL_KNOWN_HOSTS), home, sshdir, tokens)
    name = lookup_name(lookup_host, lookup_port)
    for path in (user_kh, global_kh):
        setup.known.extend(parse_known_hosts(_read_text(path), name))
    paths = [_expand(p, home, sshdir, tokens) for p in conf.identities]
    for p in dict.fromkeys(paths + [os.path.join(sshdir, n) for n in DEFAULT_IDENTITIES]):
        key = _load_key(p)
        if key is not None:
            setup.keys.append(key)
    return setup
