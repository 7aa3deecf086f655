"""One log line when a job starts and one when it ends, saying what it works on, how much it
did, how long it took and, if it failed, why: at the default log level this is what a user
reads about a backup (the events are for QMP clients)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("blockd.job")

_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB")


def fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class JobLog:
    """The start and end lines of one job."""

    def __init__(self, job_id: str, kind: str) -> None:
        self.job_id = job_id  # checked by JobManager: no spaces or newlines
        self.kind = kind
        self.what = ""
        self._t0: float | None = None

    def started(self, what: str) -> None:
        self.what = what
        self._t0 = time.monotonic()
        log.info("job %s: %s started: %s", self.job_id, self.kind, what)

    def ended(self, outcome: str, nbytes: int | None, error: str | None = None) -> None:
        """*outcome* is completed, cancelled or failed; *nbytes* what was copied (None for
        jobs that copy nothing)."""
        elapsed = time.monotonic() - self._t0 if self._t0 is not None else 0.0
        done = f"in {elapsed:.2f} s"
        if nbytes is not None:
            rate = nbytes / elapsed if elapsed > 0 else 0.0
            done = f"{fmt_bytes(nbytes)} {done} ({fmt_bytes(int(rate))}/s)"
        what = f": {self.what}" if self.what else ""
        if outcome == "failed":
            log.error("job %s: %s failed after %s%s: %s", self.job_id, self.kind, done, what, error)
        else:
            log.info("job %s: %s %s, %s%s", self.job_id, self.kind, outcome, done, what)
