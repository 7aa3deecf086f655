"""What a run shows while it works: bars on a terminal, plain lines in a log, JSON for scripts.

The numbers come from ``query-jobs`` (``current-progress``/``total-progress`` of each disk's
backup job), polled by the run. On a terminal each disk gets a ``tqdm`` bar with rate and ETA
on stderr; when stderr is not a terminal a line per disk is printed at each further tenth (or
every 10 s), so cron mail stays short; with ``--json`` every report is a JSON object on its own
line on stdout and nothing else is printed there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

MiB = 1024 * 1024


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


class Reporter:
    """Base: notes and results; subclasses show progress."""

    def __init__(self, out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def note(self, text: str) -> None:
        """A one-line message for the user (why a full backup, a busy monitor...)."""
        print(f"blockd-backup: {text}", file=self.err, flush=True)

    def result(self, text: str, **data: Any) -> None:
        """The outcome of a command: a line on stdout (JSON mode: an event)."""
        print(text, file=self.out, flush=True)

    def event(self, kind: str, **data: Any) -> None:
        """A structured event; only JSON mode prints these."""

    def start(self, disks: list[str]) -> None:
        pass

    def update(self, disk: str, done: int, total: int) -> None:
        pass

    def finish(self, ok: bool) -> None:
        pass


class BarReporter(Reporter):
    """One tqdm bar per disk, on a terminal."""

    def __init__(self, out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        super().__init__(out, err)
        self.bars: dict[str, tqdm[Any]] = {}
        self.order: list[str] = []

    def start(self, disks: list[str]) -> None:
        self.order = list(disks)

    def _bar(self, disk: str, total: int) -> tqdm[Any]:
        """The bar of *disk*, made on its first report, once the job knows its length."""
        bar = self.bars.get(disk)
        if bar is not None:
            return bar
        width = max(len(d) for d in self.order)
        # A pty nobody sized (script, CI runners) reports 0x0, and tqdm then draws nothing
        # (no column for the bar, no row for it): assume 80x24 there.
        try:
            size = os.get_terminal_size(self.err.fileno())
            cols, rows = size.columns, size.lines
        except (OSError, ValueError):
            cols = rows = 0
        from tqdm import tqdm  # only a terminal needs it (and its import time)

        bar = self.bars[disk] = tqdm(
            total=total,
            desc=disk.ljust(width),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            position=self.order.index(disk),
            leave=True,
            file=self.err,
            dynamic_ncols=cols > 0,
            ncols=None if cols > 0 else 80,
            nrows=None if rows > 0 else 24,
            mininterval=0.1,
        )
        return bar

    def update(self, disk: str, done: int, total: int) -> None:
        bar = self._bar(disk, total)
        if bar.total != total:
            bar.total = total
        if done != bar.n:
            bar.update(done - bar.n)

    def note(self, text: str) -> None:
        if self.bars:
            next(iter(self.bars.values())).write(f"blockd-backup: {text}", file=self.err)
        else:
            super().note(text)

    def finish(self, ok: bool) -> None:
        for bar in self.bars.values():
            if ok and bar.total:
                bar.update(bar.total - bar.n)
            bar.close()
        self.bars.clear()


class LineReporter(Reporter):
    """Plain progress lines, for logs."""

    STEP = 10  # percent
    EVERY = 10.0  # seconds

    def __init__(self, out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        super().__init__(out, err)
        self.seen: dict[str, tuple[int, float, int]] = {}
        self.t0 = time.monotonic()

    def start(self, disks: list[str]) -> None:
        self.t0 = time.monotonic()
        self.seen = {d: (-1, self.t0, 0) for d in disks}

    def update(self, disk: str, done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        last_pct, last_t, _ = self.seen[disk]
        now = time.monotonic()
        if pct // self.STEP > last_pct // self.STEP or now - last_t >= self.EVERY:
            self.seen[disk] = (pct, now, done)
            took = now - self.t0
            speed = ""
            if took >= 1 and done:  # a rate from the first poll says nothing
                rate = done / took
                left = f", about {(total - done) / rate:.0f} s left" if done < total else ""
                speed = f", {human(rate)}/s{left}"
            print(f"{disk}: {pct}% of {human(total)}{speed}", file=self.err, flush=True)


class JsonReporter(Reporter):
    """JSON lines on stdout; notes become events too."""

    EVERY = 0.5

    def __init__(self, out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        super().__init__(out, err)
        self.last: dict[str, float] = {}
        self.t0 = time.monotonic()

    def _emit(self, obj: dict[str, Any]) -> None:
        print(json.dumps(obj), file=self.out, flush=True)

    def note(self, text: str) -> None:
        self._emit({"event": "note", "message": text})

    def result(self, text: str, **data: Any) -> None:
        self._emit({"event": "result", "message": text, **data})

    def event(self, kind: str, **data: Any) -> None:
        self._emit({"event": kind, **data})

    def start(self, disks: list[str]) -> None:
        self.t0 = time.monotonic()
        self.last = {d: 0.0 for d in disks}

    def update(self, disk: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last[disk] >= self.EVERY or (done == total and self.last[disk] >= 0):
            self.last[disk] = -1.0 if done == total else now
            rate = done / max(now - self.t0, 1e-6)
            self._emit(
                {"event": "progress", "disk": disk, "done": done, "total": total, "rate": rate}
            )


def make_reporter(json_mode: bool) -> Reporter:
    if json_mode:
        return JsonReporter()
    if sys.stderr.isatty():
        return BarReporter()
    return LineReporter()
