"""Terminal sessions written in a Markdown document, replayed against the real programs.

A session is a fenced ```text block that reads as a terminal transcript:

- ``$ COMMAND`` is typed into a shell. ``./scripts/blockd ...`` starts a daemon in the
  background (the document's "first terminal"); ``.venv/bin/qmp-shell ...`` starts the
  interactive shell that the following ``(QEMU)`` lines go to, and replaces the one before;
  anything else runs in ``bash`` and must exit 0 unless the document shows its error (a line
  starting with ``PROGRAM: ``, as QEMU's tools and nbdinfo print them);
  ``kill`` is complete once a daemon has ended (as the first terminal would show).
- ``(QEMU) COMMAND`` and ``TRANS> COMMAND`` are typed into that qmp-shell, which must be
  showing that very prompt; a bare ``(QEMU)`` is Enter on an empty line (qmp-shell then prints
  the events it has received).
- Every other line is what the command printed. ``...`` stands for any text, as with doctest's
  ELLIPSIS: the documents use it for timestamps, rates and the parts of long replies they leave
  out. For a daemon, the lines shown must be in its log so far (more may follow).

A ``query-...`` command whose reply does not match yet is typed again until it does (within
30 s), as a user waits for a job by repeating ``query-jobs``; every other command gets one try.
Paths under ``/tmp/`` are moved into the test's own directory, in commands and output alike.
"""

from __future__ import annotations

import doctest
import os
import re
import select
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from support import wait_for_socket

PROMPTS = ("$", "(QEMU)", "TRANS>")
FENCE = re.compile(r"^```text\n(.*?)^```[ \t]*$", re.S | re.M)
RETRY_SECONDS = 30.0


@dataclass(frozen=True)
class Step:
    where: str  # document:line, for failure messages
    prompt: str
    command: str
    expected: str

    def __str__(self) -> str:
        return f"{self.where}: {self.prompt} {self.command}".rstrip()


def _split_prompt(line: str) -> tuple[str, str] | None:
    for prompt in PROMPTS:
        if line == prompt or line.startswith(prompt + " "):
            return prompt, line[len(prompt) + 1 :]
    return None


def sessions(text: str, name: str) -> list[list[Step]]:
    """Every ```text block of *text*, in order, as steps. A block that does not open with a
    prompt is an error: a transcript nobody replays would go stale unnoticed."""
    out: list[list[Step]] = []
    for m in FENCE.finditer(text):
        first = text.count("\n", 0, m.start(1)) + 1
        steps: list[Step] = []
        pending: tuple[int, str, str] | None = None
        printed: list[str] = []
        for i, line in enumerate(m.group(1).splitlines()):
            split = _split_prompt(line.rstrip())
            if split is None:
                if pending is None:
                    raise ValueError(f"{name}:{first + i}: a text block must open with a prompt")
                printed.append(line)
                continue
            if pending is not None:
                steps.append(_step(name, pending, printed))
            pending, printed = (first + i, *split), []
        if pending is not None:
            steps.append(_step(name, pending, printed))
        out.append(steps)
    return out


def _step(name: str, head: tuple[int, str, str], printed: list[str]) -> Step:
    line, prompt, command = head
    return Step(f"{name}:{line}", prompt, command.strip(), "\n".join(printed))


def normalize(text: str) -> str:
    """Trailing blanks are invisible in a document (and editors strip them)."""
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def matches(expected: str, got: str) -> bool:
    want, have = normalize(expected), normalize(got)
    return want == have or doctest.OutputChecker().check_output(want, have, doctest.ELLIPSIS)


class QmpShell:
    """An interactive qmp-shell on pipes: a line goes in, everything it prints up to its next
    prompt comes back. (With stdin not a terminal it does not echo what is typed.)"""

    PROMPTS = (b"(QEMU) ", b"TRANS> ")

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.prompt = ""
        self.banner = self._answer()

    def _answer(self, timeout: float = 60) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(self.PROMPTS):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"qmp-shell showed no prompt; it printed {buf!r}")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"qmp-shell exited; it printed {buf!r}")
                buf += chunk
        self.prompt = buf[-7:].decode().rstrip()
        return buf[:-7].decode()

    def type(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()  # end of input: the shell says goodbye and exits
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class Replay:
    """Plays sessions in order against one test directory; daemons and the current qmp-shell
    live from one session to the next, as terminals do."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root = root
        self.tmp = tmp
        self.env = {
            **os.environ,
            "HOME": str(tmp),  # qmp-shell keeps its history there
            "LC_ALL": "C",
            "TERM": "dumb",
            "PYTHONUNBUFFERED": "1",
        }
        self.daemons: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.shell: QmpShell | None = None
        self.shell_sock = ""

    def here(self, text: str) -> str:
        return text.replace("/tmp/", f"{self.tmp}/")

    def play(self, steps: list[Step]) -> None:
        for step in steps:
            self.step(step)

    def step(self, step: Step) -> None:
        command, expected = self.here(step.command), self.here(step.expected)
        if step.prompt != "$":
            self._qmp(step, command, expected)
            return
        argv = shlex.split(command, comments=True)
        if argv[0] == "./scripts/blockd":
            got = self._start_daemon(step, command, argv, expected)
        elif argv[0].endswith("/qmp-shell"):
            got = self._start_shell(argv)
        else:
            alive = [p for p, _ in self.daemons.values() if p.poll() is None]
            res = subprocess.run(
                ["bash", "-c", command],
                cwd=self.root,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=120,
            )
            got = res.stdout.decode(errors="replace")
            # An ellipsis could swallow an error line (qemu-io prints its pattern mismatches
            # between the lines a document shows), so a failure must be shown as one.
            shown_error = any(
                line.startswith(f"{os.path.basename(argv[0])}: ") for line in expected.splitlines()
            )
            if res.returncode != 0 and not shown_error:
                self._fail(step, expected, got, f"exited {res.returncode}")
            if argv[0] == "kill" and not self._one_exits(alive):
                self._fail(step, expected, got, "no daemon ended")
        if not matches(expected, got):
            self._fail(step, expected, got)

    def _qmp(self, step: Step, command: str, expected: str) -> None:
        if self.shell is None:
            self._fail(step, expected, "", "no qmp-shell is running")
        assert self.shell is not None
        if self.shell.prompt != step.prompt:
            self._fail(step, expected, "", f"the shell shows {self.shell.prompt!r}")
        deadline = time.monotonic() + RETRY_SECONDS
        while True:
            got = self.shell.type(command)
            if matches(expected, got):
                break
            if not command.startswith("query-") or time.monotonic() > deadline:
                self._fail(step, expected, got)
            time.sleep(0.05)
        if command == "quit":
            proc, log = self.daemons[self.shell_sock]
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                rc = None
            if rc != 0:
                self._fail(step, expected, got, f"the daemon ended with {rc}; log {log}")

    def _start_daemon(self, step: Step, command: str, argv: list[str], expected: str) -> str:
        if "--socket" not in argv:  # the default socket is shared with everything else
            self._fail(step, expected, "", "a daemon in a document must name its --socket")
        sock = argv[argv.index("--socket") + 1]
        old = self.daemons.get(sock)
        if old is not None:  # the document stopped it (quit, kill) before starting again
            try:
                old[0].wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._fail(step, expected, "", f"the daemon on {sock} is still running")
        log = self.tmp / f"daemon-{len(self.daemons)}-{time.monotonic_ns()}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", command],
                cwd=self.root,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.daemons[sock] = (proc, log)
        wait_for_socket(Path(sock), proc, timeout=120)  # the first run may install .venv
        shown = f"{expected}\n..." if expected.strip() else "..."
        deadline = time.monotonic() + 10
        while True:
            got = log.read_text(errors="replace")
            if matches(shown, got):
                return expected
            if time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    @staticmethod
    def _one_exits(procs: list[subprocess.Popen[bytes]], timeout: float = 20) -> bool:
        """A ``kill`` is over when its daemon has ended, as the first terminal shows; the
        signal alone does not release the image locks yet."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                return True
            time.sleep(0.02)
        return False

    def _start_shell(self, argv: list[str]) -> str:
        if self.shell is not None:
            self.shell.close()
        self.shell = QmpShell(argv, self.root, self.env)
        self.shell_sock = argv[-1]
        return self.shell.banner

    def _fail(self, step: Step, expected: str, got: str, why: str = "") -> None:
        logs = ""
        for sock, (_, log) in self.daemons.items():
            tail = log.read_text(errors="replace").splitlines()[-15:]
            logs += f"\n--- log of the daemon on {sock} (end)\n" + "\n".join(tail)
        raise AssertionError(f"{step}\n{why}\n--- shown\n{expected}\n--- got\n{got}{logs}")

    def close(self) -> list[str]:
        """Stop what the document left running; the daemons that did not end cleanly."""
        if self.shell is not None:
            self.shell.close()
            self.shell = None
        bad = []
        for sock, (proc, log) in self.daemons.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                if proc.returncode != 0:
                    bad.append(f"{sock}: {proc.returncode}, log {log}")
        return bad
