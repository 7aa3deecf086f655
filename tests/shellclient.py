"""qmp-shell driven as a user types into it: a subprocess fed lines in its own syntax, whose
replies and events are read from what it prints (tests of documents written for qmp-shell)."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

QMP_SHELL = str(Path(sys.executable).parent / "qmp-shell")


def shell_words(args: dict[str, Any]) -> list[str]:
    """``key=value`` words as a qmp-shell user types them; objects and lists as JSON without
    spaces. (qmp-shell's dotted keys, ``file.driver=file file.filename=...``, are no use:
    qemu.qmp 0.0.6 nests every word after the first dotted one inside that object.)"""
    words: list[str] = []
    for key, val in args.items():
        if isinstance(val, bool):
            text = "true" if val else "false"
        elif isinstance(val, int):
            text = str(val)
        elif isinstance(val, dict | list):
            text = json.dumps(val, separators=(",", ":"))
        else:
            text = str(val)
            # qmp-shell keeps quotes and turns numbers and true/false into non-strings
            assert text and not any(c.isspace() or c in "'\"" for c in text), text
            assert text.lower() not in ("true", "false") and not text.lstrip("-").isdigit()
        words.append(f"{key}={text}")
    return words


class ShellError(Exception):
    pass


class ShellClient:
    """``qmp-shell -p`` in a subprocess. Lines go to its stdin as typed; everything it prints
    up to its next prompt is the answer. Events are what it prints for an empty line."""

    PROMPTS = (b"(QEMU) ", b"TRANS> ")

    def __init__(self, sock: Path, home: Path) -> None:
        env = {**os.environ, "HOME": str(home), "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
        self.proc = subprocess.Popen(
            [QMP_SHELL, "-p", str(sock)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.transcript = ""
        self.events: list[dict[str, Any]] = []
        self.prompt = b""
        self.banner = self._read_answer()
        assert "Welcome to the QMP low-level shell!" in self.banner, self.banner

    def _read_answer(self, timeout: float = 60) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(self.PROMPTS):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"qmp-shell gave no prompt; output so far {buf!r}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"qmp-shell exited; output {buf!r}")
            buf += chunk
        self.transcript += buf.decode()
        self.prompt = buf[-7:]
        return buf[:-7].decode()

    def type(self, line: str) -> str:
        """Type *line* and Enter; return what the shell printed before its next prompt."""
        assert self.proc.stdin is not None
        self.transcript += line + "\n"
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._read_answer()

    def _reply(self, out: str) -> Any:
        try:
            reply = json.loads(out)
        except ValueError:
            raise AssertionError(f"qmp-shell printed no reply: {out!r}") from None
        if "error" in reply:
            raise ShellError(reply["error"]["desc"])
        assert set(reply) == {"return"}, reply
        return reply["return"]

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return self._reply(self.type(" ".join([cmd, *shell_words(args or {})])))

    async def transaction(self, actions: list[tuple[str, dict[str, Any]]]) -> Any:
        assert self.type("transaction(") == "" and self.prompt == b"TRANS> "
        for kind, data in actions:
            assert self.type(" ".join([kind, *shell_words(data)])) == ""
            assert self.prompt == b"TRANS> "
        out = self.type(")")
        assert self.prompt == b"(QEMU) "
        return self._reply(out)

    def poll(self) -> None:
        """Press Enter on an empty line: qmp-shell prints the events it has, one per line."""
        for line in self.type("").splitlines():
            if line.strip():
                ev = ast.literal_eval(line)
                assert isinstance(ev, dict) and "event" in ev, line
                self.events.append(ev)

    async def wait_event(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60
    ) -> dict[str, Any]:
        seen = 0
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events[seen:]:
                if pred(ev):
                    return ev
            seen = len(self.events)
            if time.monotonic() > deadline:
                raise AssertionError(f"event not seen; have {[e['event'] for e in self.events]}")
            await asyncio.sleep(0.02)
            self.poll()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # EOF: the shell says goodbye and exits
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.transcript += self.proc.stdout.read().decode()
        self.proc.stdout.close()
