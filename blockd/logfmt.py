"""One log record, one line: names, ids, paths and error texts chosen by a QMP or NBD client
reach the log through many call sites, and a newline in any of them would let that client
write a line that looks like the daemon's own. Escaping them here, in the one formatter the
daemon installs, covers every call site at once.
"""

from __future__ import annotations

import logging
import re
from types import TracebackType
from typing import TypeAlias

_ExcInfo: TypeAlias = (
    tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
)

#: Characters that end or rewrite a line on a terminal or in a log reader: C0 controls,
#: DEL, C1 controls and the Unicode line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

#: Marks every line of a traceback, so none of them can pass for a record of its own.
TRACE_PREFIX = "  | "


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group(0)
    short = _SHORT.get(ch)
    if short is not None:
        return short
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def escape(text: str) -> str:
    """*text* with every line-breaking or control character written as an escape."""
    return _UNSAFE.sub(_escape_char, text)


class OneLineFormatter(logging.Formatter):
    """A formatter whose message part never spans lines; tracebacks keep their lines, each
    marked with :data:`TRACE_PREFIX` and escaped the same way."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: _ExcInfo) -> str:
        return _mark(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _mark(super().formatStack(stack_info))


def _mark(text: str) -> str:
    return "\n".join(TRACE_PREFIX + escape(line) for line in text.splitlines())
