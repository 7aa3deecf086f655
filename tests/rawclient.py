"""A minimal raw QMP client: sends exact bytes, reads whole CR LF terminated messages.

The differential tests need byte-level control (malformed JSON, missing members) that a
library client would refuse to send.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class RawQmp:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.greeting = self.recv()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes | str | dict[str, Any]) -> None:
        if isinstance(data, dict):
            data = json.dumps(data)
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        assert line.endswith(b"\r"), f"message not CR LF terminated: {line[-20:]!r}"
        return json.loads(line)

    def reply(self) -> dict[str, Any]:
        """The next non-event message."""
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg

    def cmd(
        self, execute: str, arguments: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            msg["arguments"] = arguments
        msg.update(extra)
        self.send(msg)
        return self.reply()

    def negotiate(self) -> None:
        assert "return" in self.cmd("qmp_capabilities")
