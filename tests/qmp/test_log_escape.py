"""Client-chosen strings cannot forge log lines: node names, job ids, export names, bitmap
names, paths and NBD export requests carrying newlines and other control characters all reach
the log, escaped, and every line of the log is either a record of the daemon's own (timestamp
first) or a marked traceback line."""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

from rawclient import RawQmp
from support import start_blockd

from blockd.logfmt import TRACE_PREFIX
from blockd.nbd import protocol as P

FORGED = "\n2030-01-01 00:00:00,000 blockd INFO blockd.qmp.session: FORGED\r\x1b[2K\u2028"
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} blockd (DEBUG|INFO|WARNING|ERROR) ")


def _nbd_ask(sock: Path, name: str) -> None:
    """Ask the NBD server for export *name* (NBD_OPT_INFO), then abort."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(sock))
    s.recv(18)
    s.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
    raw = name.encode()
    payload = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
    s.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_INFO, len(payload)) + payload)
    s.recv(4096)
    s.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_ABORT, 0))
    s.recv(4096)
    s.close()


def test_client_strings_cannot_forge_log_lines(tmp_path: Path) -> None:
    d = start_blockd(tmp_path)
    nbd = tmp_path / "nbd.sock"
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    try:
        q = RawQmp(d.sock, timeout=30)
        q.negotiate()
        calls = [
            ("blockdev-add", {"driver": "null-co", "node-name": "n" + FORGED}),
            ("blockdev-del", {"node-name": "n" + FORGED}),
            ("job-cancel", {"id": "j" + FORGED}),
            ("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img) + FORGED}),
            ("blockdev-add", {"driver": "null-co", "node-name": "ok"}),
            ("block-dirty-bitmap-add", {"node": "ok", "name": "b" + FORGED}),
            ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd)}}}),
            ("block-export-add", {"type": "nbd", "id": "e", "node-name": "ok", "name": FORGED}),
            ("block-export-add", {"type": "nbd", "id": "e" + FORGED, "node-name": "ok"}),
        ]
        for name, args in calls:
            q.cmd(name, args)
        _nbd_ask(nbd, "x" + FORGED)
        q.cmd("nbd-server-stop")
        q.close()
    finally:
        assert d.stop() == 0
    log = d.log_text()
    lines = log.split("\n")
    forged = [line for line in lines if line.startswith("2030-01-01")]
    assert not forged, forged[:5]
    bad = [
        line
        for line in lines
        if line and not RECORD.match(line) and not line.startswith(TRACE_PREFIX)
    ]
    assert not bad, bad[:5]
    assert "\r" not in log and "\x1b" not in log and "\u2028" not in log
    # The strings did reach the log (escaped), so the checks above saw them.
    assert log.count("\\n2030-01-01 00:00:00,000 blockd INFO blockd.qmp.session: FORGED") >= 5
