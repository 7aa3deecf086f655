"""Opening ssh nodes: every host-key mode, authentication, ports and paths, accepted and refused
by blockd exactly as qemu-storage-daemon does (class and text compared in the same run), with
the outcome also checked against what QSD is known to answer (ssh.md), so a lab that broke both
daemons alike cannot pass."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from diffsupport import Session
from sshlab import OTHER_USER, SshLab, connections
from sshtest import Pair, started_pair

NOT_FOUND = "no host key was found in known_hosts"
AUTH = (
    "failed to authenticate using publickey authentication and the identities held by "
    "your ssh-agent"
)


@dataclass
class Case:
    name: str
    #: Changes the client files (known_hosts, config, keys) before both daemons try.
    setup: Callable[[SshLab, Path], None] = lambda lab, tmp: None
    #: Changes to the blockdev-add arguments (server/port/user/path/host-key-check).
    args: Callable[[SshLab, Path], dict[str, Any]] = lambda lab, tmp: {}
    #: "ok", or a substring (or, with a leading '=', the whole text) of the expected error.
    expect: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)


def hkc_hash(kind: str, hash_type: str, text: Callable[[str], str] = str) -> Callable[..., Any]:
    def args(lab: SshLab, tmp: Path) -> dict[str, Any]:
        h = {"mode": "hash", "type": hash_type, "hash": text(lab.digest(kind, hash_type))}
        return {"host-key-check": h}

    return args


def known(*lines: Callable[[SshLab, Path], str]) -> Callable[[SshLab, Path], None]:
    def setup(lab: SshLab, tmp: Path) -> None:
        lab.write_known_hosts([line(lab, tmp) for line in lines])

    return setup


def line(kind: str, name: str | None = None) -> Callable[[SshLab, Path], str]:
    return lambda lab, tmp: lab.known_line(kind, name)


def foreign(kind: str, bits: str = "") -> Callable[[SshLab, Path], str]:
    """A known_hosts line for this server with a key it does not have."""

    def make(lab: SshLab, tmp: Path) -> str:
        path = tmp / f"foreign_{kind}{bits}"
        if not path.exists():
            extra = ["-b", bits] if bits else []
            os.system(f"ssh-keygen -q -t {kind} {' '.join(extra)} -N '' -C '' -f {path}")
        return lab.known_line(kind, pub=Path(f"{path}.pub"))

    return make


def config(text: str) -> Callable[[SshLab, Path], None]:
    def setup(lab: SshLab, tmp: Path) -> None:
        text_ = text.replace("$SSHDIR", str(lab.sshdir)).replace("$TMP", str(tmp))
        (lab.sshdir / "config").write_text(text_)

    return setup


def steps(*setups: Callable[[SshLab, Path], object]) -> Callable[[SshLab, Path], None]:
    def setup(lab: SshLab, tmp: Path) -> None:
        for step in setups:
            step(lab, tmp)

    return setup


def write_file(name: str, text: Callable[[SshLab, Path], str]) -> Callable[[SshLab, Path], None]:
    def setup(lab: SshLab, tmp: Path) -> None:
        (tmp / name).write_text(text(lab, tmp) + "\n")

    return setup


def hashed_known_hosts(lab: SshLab, tmp: Path) -> None:
    os.system(f"ssh-keygen -q -H -f {lab.sshdir / 'known_hosts'} >/dev/null 2>&1")
    Path(f"{lab.sshdir / 'known_hosts'}.old").unlink(missing_ok=True)


def no_known_hosts(lab: SshLab, tmp: Path) -> None:
    (lab.sshdir / "known_hosts").unlink()


def known_hosts_dir(lab: SshLab, tmp: Path) -> None:
    (lab.sshdir / "known_hosts").unlink()
    (lab.sshdir / "known_hosts").mkdir()


def key_renamed(lab: SshLab, tmp: Path) -> None:
    for suffix in ("", ".pub"):
        os.rename(f"{lab.client_key}{suffix}", f"{lab.sshdir / 'mykey'}{suffix}")


def port(value: Any) -> Callable[[SshLab, Path], dict[str, Any]]:
    def args(lab: SshLab, tmp: Path) -> dict[str, Any]:
        v = value.replace("PORT", str(lab.port)) if isinstance(value, str) else value
        return {"server": {"host": "127.0.0.1", "port": v}}

    return args


def mode(m: str) -> Callable[[SshLab, Path], dict[str, Any]]:
    return lambda lab, tmp: {"host-key-check": {"mode": m}}


CASES = [
    # -- host-key-check: none, hash ---------------------------------------------------------
    Case("none", known(), mode("none")),
    Case("hash-md5", args=hkc_hash("ed25519", "md5")),
    Case("hash-sha1", args=hkc_hash("ed25519", "sha1")),
    Case("hash-sha256", args=hkc_hash("ed25519", "sha256")),
    Case(
        "hash-md5-colons-upper",
        args=hkc_hash(
            "ed25519", "md5", lambda h: ":".join(h[i : i + 2] for i in range(0, 32, 2)).upper()
        ),
    ),
    Case("hash-leading-colons", args=hkc_hash("ed25519", "sha1", lambda h: "::" + h)),
    Case(
        "hash-trailing-colon",
        args=hkc_hash("ed25519", "md5", lambda h: h + ":"),
        expect="does not match host_key_check",
    ),
    Case(
        "hash-trailing-byte",
        args=hkc_hash("ed25519", "sha256", lambda h: h + "00"),
        expect="does not match host_key_check",
    ),
    Case(
        "hash-empty",
        args=hkc_hash("ed25519", "md5", lambda h: ""),
        expect="does not match host_key_check 'md5:'",
    ),
    Case(
        "hash-not-hex",
        args=hkc_hash("ed25519", "sha1", lambda h: "zz"),
        expect="remote host ssh-ed25519 key fingerprint 'sha1:",
    ),
    Case("hash-of-rsa-key", args=hkc_hash("rsa", "md5"), expect="remote host ssh-ed25519 key"),
    # libssh offers the key types known_hosts lists first, even in hash mode
    Case("hash-rsa-when-only-rsa-known", known(line("rsa")), hkc_hash("rsa", "md5")),
    Case(
        "hash-ed25519-when-only-rsa-known",
        known(line("rsa")),
        hkc_hash("ed25519", "sha256"),
        expect="remote host ssh-rsa key fingerprint 'sha256:",
    ),
    Case("hash-ecdsa-when-only-ecdsa-known", known(line("ecdsa")), hkc_hash("ecdsa", "sha1")),
    Case("hash-no-known-hosts-file", no_known_hosts, hkc_hash("ed25519", "md5")),
    # -- host-key-check: known_hosts (explicit and default) --------------------------------
    Case("known-all", args=mode("known_hosts")),
    Case("known-default-mode"),
    Case("known-only-rsa", known(line("rsa"))),
    Case("known-only-ecdsa", known(line("ecdsa"))),
    Case(
        "known-changed-ed25519",
        known(foreign("ed25519")),
        expect="host key (ssh-ed25519 key with fingerprint SHA256:",
    ),
    Case(
        "known-changed-ecdsa",
        known(foreign("ecdsa")),
        expect="host key (ecdsa-sha2-nistp256 key with fingerprint SHA256:",
    ),
    Case(
        "known-changed-first-wins",
        known(line("rsa"), foreign("ed25519")),
        expect="does not match the one in known_hosts; this may be a possible attack",
    ),
    Case(
        "known-other-type",
        known(foreign("ecdsa", "384")),
        expect="=host key for this server not found, another type exists",
    ),
    Case("known-other-type-and-good", known(foreign("ecdsa", "384"), line("ed25519"))),
    Case("known-portless-entry", known(line("ed25519", "127.0.0.1")), expect="=" + NOT_FOUND),
    Case("known-wildcard-entry", known(line("ed25519", "[127.0.0.*]:*"))),
    # libssh reads "!" literally in known_hosts: the positive pattern still matches
    Case(
        "known-negated-entry",
        known(
            lambda lab, tmp: lab.known_line(
                "ed25519", f"[127.0.0.1]:{lab.port},![127.0.0.1]:{lab.port}"
            )
        ),
    ),
    Case("known-hashed", hashed_known_hosts),
    Case("known-empty", known(), expect="=" + NOT_FOUND),
    Case("known-no-file", no_known_hosts, expect="=" + NOT_FOUND),
    Case("known-is-directory", known_hosts_dir, expect="=" + NOT_FOUND),
    Case("known-other-host-only", known(line("ed25519", "otherhost")), expect="=" + NOT_FOUND),
    # -- ~/.ssh/config ----------------------------------------------------------------------
    Case(
        "config-strict-no-unknown",
        steps(no_known_hosts, config("StrictHostKeyChecking no\n")),
    ),
    Case(
        "config-strict-no-changed",
        steps(known(foreign("ed25519")), config("Host 127.0.0.1\n  StrictHostKeyChecking no\n")),
    ),
    Case(
        "config-strict-other-host",
        steps(no_known_hosts, config("Host elsewhere\n  StrictHostKeyChecking no\n")),
        expect="=" + NOT_FOUND,
    ),
    Case(
        "config-user-known-hosts-file",
        steps(write_file("kh2", foreign("ed25519")), config("UserKnownHostsFile $TMP/kh2\n")),
        expect="does not match the one in known_hosts",
    ),
    Case("config-port-changes-lookup", config("Port 22\n"), expect="=" + NOT_FOUND),
    Case(
        "config-identityfile-tilde",
        steps(key_renamed, config("IdentityFile ~/.ssh/mykey\n")),
    ),
    Case(
        "config-identityfile-absolute",
        steps(key_renamed, config("Host 127.0.0.1\n IdentityFile $SSHDIR/mykey\n")),
    ),
    Case(
        "config-identityfile-percent-d",
        steps(key_renamed, config("IdentityFile %d/mykey\n")),
    ),
    Case(
        "config-identityfile-other-host",
        steps(key_renamed, config("Host elsewhere\n IdentityFile ~/.ssh/mykey\n")),
        expect="=" + AUTH,
    ),
    Case("config-user-not-honoured", config("User nobody-at-all\n")),
    Case(
        "config-include",
        steps(
            key_renamed,
            lambda lab, tmp: (lab.sshdir / "extra.conf").write_text("IdentityFile ~/.ssh/mykey\n"),
            config("Include extra.conf\n"),
        ),
    ),
    # -- authentication ---------------------------------------------------------------------
    Case("user-explicit", args=lambda lab, tmp: {"user": lab.user}),
    Case("user-unknown", args=lambda lab, tmp: {"user": "no-such-user-here"}, expect="=" + AUTH),
    Case("user-without-key", args=lambda lab, tmp: {"user": OTHER_USER}, expect="=" + AUTH),
    Case("no-identity", key_renamed, expect="=" + AUTH),
    Case(
        "host-key-checked-before-auth",
        known(foreign("ed25519")),
        lambda lab, tmp: {"user": "no-such-user-here"},
        expect="may be a possible attack",
    ),
    # -- server ------------------------------------------------------------------------------
    Case("port-name", args=port("ssh"), expect="=Use only numeric port value"),
    Case("port-trailing", args=port("PORTx"), expect="=Use only numeric port value"),
    Case("port-empty", args=port(""), expect="=Use only numeric port value"),
    Case("port-too-big", args=port("4294967296"), expect="=Use only numeric port value"),
    Case("port-minus-one", args=port("-1"), expect="address resolution failed for 127.0.0.1:-1"),
    Case(
        "port-nothing-listens",
        args=port("1"),
        expect="=Failed to connect to '127.0.0.1:1': Connection refused",
    ),
    Case("port-leading-blank", args=port(" PORT")),
    Case("port-plus", args=port("+PORT")),
    Case(
        "port-integer",
        args=port(22),
        expect="=Invalid parameter type for 'server.port', expected: string",
    ),
    Case(
        "host-unresolvable",
        args=lambda lab, tmp: {"server": {"host": "no-such-host.invalid", "port": "22"}},
        expect="address resolution failed for no-such-host.invalid:22",
    ),
    # -- path --------------------------------------------------------------------------------
    Case(
        "path-missing",
        args=lambda lab, tmp: {"path": str(tmp / "nope")},
        expect="SFTP server: No such file (libssh error code: 1, sftp error code: 2)",
    ),
    Case(
        "path-relative-missing",
        args=lambda lab, tmp: {"path": "nope.img"},
        expect="=failed to open remote file 'nope.img': SFTP server: No such file "
        "(libssh error code: 1, sftp error code: 2)",
    ),
    Case(
        "path-directory",
        args=lambda lab, tmp: {"path": str(tmp)},
        expect="SFTP server: Failure (libssh error code: 1, sftp error code: 4)",
    ),
    Case("path-directory-read-only", args=lambda lab, tmp: {"path": str(tmp), "read-only": True}),
]


#: Variations left out of the default run (``-m slow`` runs them): one case per rule stays in.
SLOW = {
    "config-include",
    "config-identityfile-absolute",
    "config-identityfile-other-host",
    "config-strict-no-changed",
    "config-strict-other-host",
    "config-user-not-honoured",
    "hash-ecdsa-when-only-ecdsa-known",
    "hash-empty",
    "hash-leading-colons",
    "hash-no-known-hosts-file",
    "hash-of-rsa-key",
    "hash-sha1",
    "hash-trailing-byte",
    "host-unresolvable",
    "known-changed-ecdsa",
    "known-changed-first-wins",
    "known-empty",
    "known-is-directory",
    "known-negated-entry",
    "known-only-ecdsa",
    "known-other-host-only",
    "known-other-type-and-good",
    "known-wildcard-entry",
    "path-directory-read-only",
    "path-relative-missing",
    "port-empty",
    "port-leading-blank",
    "port-plus",
    "port-too-big",
    "port-trailing",
    "user-explicit",
}


def outcome(s: Session, args: dict[str, Any]) -> tuple[str, str]:
    r = s.cmd("blockdev-add", args)
    if "return" in r:
        s.ok("blockdev-del", {"node-name": args["node-name"]})
        return ("ok", "")
    return (r["error"]["class"], r["error"]["desc"])


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.name in SLOW else []) for c in CASES],
)
def test_open_like_qsd(case: Case, lab: SshLab, pair: Pair, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    case.setup(lab, tmp_path)
    args = {**lab.node("s0", image), **case.args(lab, tmp_path)}
    got = {kind: outcome(s, args) for kind, s in pair.sessions.items()}
    assert got["blockd"] == got["qsd"]
    cls, desc = got["blockd"]
    if case.expect == "ok":
        assert cls == "ok", desc
    elif case.expect.startswith("="):
        assert (cls, desc) == ("GenericError", case.expect[1:])
    else:
        assert cls == "GenericError" and case.expect in desc, desc


def test_no_connection_left_after_failures(lab: SshLab, pair: Pair, tmp_path: Path) -> None:
    """After every refusal above and every blockdev-del, blockd holds no connection to the
    server (qemu-storage-daemon keeps many)."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    s = pair.sessions["blockd"]
    for _ in range(3):
        s.ok("blockdev-add", lab.node("k", image))
        s.ok("blockdev-del", {"node-name": "k"})
        lab.write_known_hosts([])
        s.err("blockdev-add", lab.node("k", image))
        lab.write_known_hosts(lab.known_hosts_lines())
        s.err("blockdev-add", {**lab.node("k", image), "user": "no-such-user-here"})
    assert connections(pair.daemons["blockd"].proc.pid, lab.port) == 0


def test_agent_keys_authenticate(lab: SshLab, tmp_path: Path) -> None:
    """With no identity file left, a key held by an ssh-agent ($SSH_AUTH_SOCK) still logs in,
    in both daemons (a throwaway agent on a socket in tmp_path)."""
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        env = {**lab.env(), "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(lab.client_key)], env=env, check=True)
        key_renamed(lab, tmp_path)
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(4096))
        with started_pair(lab, tmp_path, SSH_AUTH_SOCK=str(sock)) as pair:
            got = {kind: outcome(s, lab.node("ag", image)) for kind, s in pair.sessions.items()}
        assert got == {"blockd": ("ok", ""), "qsd": ("ok", "")}
    finally:
        agent.terminate()
        agent.wait()
