"""The tool's one error type and its exit codes (documented in docs/backup-tool.md).

Every failure a user can meet ends as a :class:`ToolError` with a one-line message; the exit
code says which kind of failure it was, so scripts can tell "try again later" (locked, daemon
unreachable) from "something is wrong with the backups" (verify).
"""

from __future__ import annotations

EXIT_OK = 0
#: The command failed; whatever it changed was rolled back (a failed run takes no point).
EXIT_FAILED = 1
#: Bad command line (argparse's own code).
EXIT_USAGE = 2
#: ``verify`` found a difference or a damaged layer.
EXIT_VERIFY = 3
#: Another blockd-backup command holds the directory.
EXIT_LOCKED = 4
#: The daemon's QMP socket does not answer (missing, refused, or busy past --busy-timeout).
EXIT_DAEMON = 5
#: Interrupted (ctrl-c or SIGTERM) after cleaning up.
EXIT_INTERRUPTED = 130


class ToolError(Exception):
    """A failure reported to the user as one line, with the exit code of its kind."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message


class DaemonUnreachable(ToolError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_DAEMON)


class DaemonLost(ToolError):
    """The connection broke while a command or a run was under way."""


class QmpFailed(ToolError):
    """The daemon answered a command with an error (its class and text are kept)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc

    @property
    def missing(self) -> bool:
        """The error says the node (or bitmap, export) does not exist. Daemons word it
        differently by command: "Failed to find node with node-name=...", "Cannot find
        device=... nor node-name=...", "Node 'x' not found", "Dirty bitmap 'b' not found"."""
        return any(w in self.desc for w in ("not found", "Cannot find", "Failed to find"))
