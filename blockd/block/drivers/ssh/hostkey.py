"""Host key checks for the ssh driver, decided the way libssh 0.10 decides them for
qemu-storage-daemon, with QEMU's texts.

asyncssh is given an empty trust list, so every host key it receives during the key exchange is
handed to :func:`check_host_key` before any authentication is attempted (QEMU checks the key
between ``ssh_connect`` and authentication too: a refused host never sees a signature).

Two libssh behaviours are reproduced because users can see them: the host key algorithms that
known_hosts lists for the host are offered first, even in ``none`` and ``hash`` mode (so the hash
is compared with the key of that type), and the known_hosts verdict is one of four (match,
changed, another type, unknown) with the texts below.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

#: libssh 0.10's default host key algorithms, in its order of preference.
LIBSSH_HOSTKEY_ALGS = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp521",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp256",
    "rsa-sha2-512",
    "rsa-sha2-256",
)

NOT_FOUND = "no host key was found in known_hosts"
OTHER_TYPE = "host key for this server not found, another type exists"


@dataclass(frozen=True, slots=True)
class KnownKey:
    """One known_hosts entry that matched the host: its key type and public key blob."""

    key_type: str
    blob: bytes


def lookup_name(host: str, port: int) -> str:
    """The name libssh looks up in known_hosts: ``host``, or ``[host]:port`` off port 22."""
    host = host.lower()
    return host if port == 22 else f"[{host}]:{port}"


def wildcard_match(pattern: str, name: str) -> bool:
    """OpenSSH's match_pattern: ``*`` and ``?`` are the only wildcards (``[`` is literal, as
    in ``[host]:port``), compared without case."""
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name, re.IGNORECASE | re.DOTALL) is not None


def _pattern_matches(patterns: str, name: str) -> bool:
    if patterns.startswith("|1|"):
        try:
            _, _, salt, digest = patterns.split("|", 3)
            mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
            return hmac.compare_digest(mac, base64.b64decode(digest))
        except (ValueError, binascii.Error):
            return False
    # libssh 0.10 reads "!" in known_hosts literally: no negation there, unlike ssh_config.
    return any(wildcard_match(pat, name) for pat in patterns.split(","))


def parse_known_hosts(text: str, name: str) -> list[KnownKey]:
    """The entries of an OpenSSH known_hosts text that name *name* (plain, wildcard or
    hashed). Lines libssh cannot use (markers, bad base64) are skipped, as libssh does."""
    found: list[KnownKey] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith("@"):
            continue
        fields = line.split()
        if len(fields) < 3 or not _pattern_matches(fields[0], name):
            continue
        try:
            blob = base64.b64decode(fields[2], validate=True)
        except (ValueError, binascii.Error):
            continue
        found.append(KnownKey(fields[1], blob))
    return found


def preferred_algs(known: Iterable[KnownKey]) -> list[str]:
    """libssh's host key algorithm list: the kinds known_hosts has for the host first."""
    types = {k.key_type for k in known}

    def listed(alg: str) -> bool:
        kind = "ssh-rsa" if alg.startswith("rsa-sha2-") else alg
        return kind in types

    first = [a for a in LIBSSH_HOSTKEY_ALGS if listed(a)]
    return first + [a for a in LIBSSH_HOSTKEY_ALGS if a not in first]


def hash_matches(digest: bytes, given: str) -> bool:
    """QEMU's fingerprint comparison: colons may precede any byte's two hex digits, any case;
    nothing may follow the last byte."""
    pos = 0
    for byte in digest:
        while pos < len(given) and given[pos] == ":":
            pos += 1
        pair = given[pos : pos + 2]
        if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            return False
        if int(pair, 16) != byte:
            return False
        pos += 2
    return pos == len(given)


def check_hash(key_type: str, blob: bytes, hash_type: str, given: str) -> str | None:
    """None when the digest of the server's key blob matches *given*, else QEMU's text."""
    digest = hashlib.new(hash_type, blob).digest()
    if hash_matches(digest, given):
        return None
    return (
        f"remote host {key_type} key fingerprint '{hash_type}:{digest.hex()}' does not match "
        f"host_key_check '{hash_type}:{given}'"
    )


def check_known_hosts(key_type: str, blob: bytes, known: list[KnownKey]) -> str | None:
    """libssh's verdict on the server's key against the entries for this host."""
    if any(k.blob == blob for k in known):
        return None
    if any(k.key_type == key_type for k in known):
        sha = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
        return (
            f"host key ({key_type} key with fingerprint SHA256:{sha}) does not match the one "
            "in known_hosts; this may be a possible attack"
        )
    return OTHER_TYPE if known else NOT_FOUND
