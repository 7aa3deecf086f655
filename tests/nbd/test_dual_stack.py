"""``nbd-server-start`` on host ``"::"`` or ``""`` listens on IPv4 and IPv6 alike, as
qemu-storage-daemon does (``nbd://localhost:PORT`` then works whichever address localhost
resolves to first); ``ipv4``/``ipv6`` narrow it to one family."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from nbdtest import daemon

LOOPBACKS = {"ipv4": (socket.AF_INET, "127.0.0.1"), "ipv6": (socket.AF_INET6, "::1")}


def _free_dual_stack_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return int(s.getsockname()[1])


def _answers(family: int, addr: str, port: int) -> bool:
    """Whether an NBD server greets on addr:port (the first 8 bytes are NBDMAGIC)."""
    with socket.socket(family) as s:
        s.settimeout(5)
        try:
            s.connect((addr, port))
            return s.recv(8) == b"NBDMAGIC"
        except OSError:
            return False


@pytest.mark.parametrize(
    "extra",
    [
        {"host": "::"},
        {"host": ""},
        {"host": "::", "ipv6": True, "ipv4": False},
        {"host": "", "ipv4": True, "ipv6": False},
    ],
    ids=["any6", "empty", "any6-v6only", "empty-v4only"],
)
def test_families_served_match_qsd(tmp_path: Path, extra: dict[str, Any]) -> None:
    seen: dict[str, dict[str, bool]] = {}
    for kind in ("qsd", "blockd"):
        port = _free_dual_stack_port()
        with daemon(tmp_path, kind) as (_d, q):
            addr = {"type": "inet", "data": {**extra, "port": str(port)}}
            q.run("nbd-server-start", {"addr": addr})
            seen[kind] = {fam: _answers(*LOOPBACKS[fam], port) for fam in LOOPBACKS}
    assert seen["blockd"] == seen["qsd"], seen
    if "ipv4" not in extra:
        assert seen["blockd"] == {"ipv4": True, "ipv6": True}
