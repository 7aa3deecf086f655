"""QEMU's JSON dialect as a byte stream: object boundaries, limits and error texts.

QMP input is not line based. ``qemu.qmp`` sends compact objects back to back, QEMU's parser
also takes single-quoted strings, and a syntax error is reported once the value it belongs to
is complete, after which parsing goes on. This module reproduces those rules (and QEMU's error
texts) so that clients see what qemu-storage-daemon would say.

Well-formed input takes a fast path (one regex scan for structure, then :func:`json.loads`);
only broken or single-quoted input goes through the slower token parser.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: Largest single message accepted (the rest of an oversized message is skipped, then
#: parsing resumes, so the connection stays usable).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_NESTING = 1024

_TOKEN = re.compile(
    rb"""[ \t\r\n]*(?:
        (?P<p>[{}\[\]:,])
      | (?P<s>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<n>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)
      | (?P<k>[a-zA-Z]+)
    )""",
    re.VERBOSE | re.DOTALL,
)
_SPACE = re.compile(rb"[ \t\r\n]*")
_INNER = re.compile(rb"[ \t\r\n,:0-9a-zA-Z.+\-]*")
_DQ_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)
_SQ_BODY = re.compile(rb"[^'\\]*(?:\\.[^'\\]*)*", re.DOTALL)


@dataclass(slots=True)
class JsonError:
    """A framing or syntax error: QEMU replies with a GenericError without id."""

    desc: str


class JsonStreamer:
    """Turns a byte stream into JSON values (or :class:`JsonError`) as they complete."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buf = bytearray()
        self._pos = 0  # next byte to scan
        self._start = -1  # start of the value being collected, -1 when between values
        self._depth = 0
        self._skipping = False  # discarding the rest of an oversized value
        self._max = max_bytes
        self._quote: int | None = None  # inside a string opened by this quote byte

    def feed(self, data: bytes) -> Iterator[Any | JsonError]:
        """Add bytes and yield every value that is now complete."""
        self._buf += data
        yield from self._scan(eof=False)
        self._compact()

    def finish(self) -> Iterator[Any | JsonError]:
        """End of input: flush a trailing scalar."""
        yield from self._scan(eof=True)

    def _compact(self) -> None:
        # While skipping, nothing before the scan position is needed; otherwise keep the
        # value being collected.
        keep = self._pos if self._skipping or self._start < 0 else self._start
        if keep > 65536 or keep == len(self._buf):
            del self._buf[:keep]
            self._pos -= keep
            self._start = -1 if self._start < 0 else max(self._start - keep, 0)

    def _oversized(self) -> Iterator[JsonError]:
        if not self._skipping and self._start >= 0 and self._pos - self._start > self._max:
            self._skipping = True
            yield JsonError(f"JSON parse error, message exceeds {self._max} bytes")

    def _scan(self, eof: bool) -> Iterator[Any | JsonError]:
        buf = self._buf
        n = len(buf)
        while True:
            if self._quote is not None:
                # Inside a string: match whole escapes so the resume point is always on an
                # escape boundary (linear time over many chunks, droppable when skipping).
                body = _DQ_BODY if self._quote == 0x22 else _SQ_BODY
                m = body.match(buf, self._pos, n)
                end = m.end() if m else self._pos
                if end >= n or buf[end] != self._quote:
                    self._pos = end
                    yield from self._oversized()
                    if eof:
                        self._quote = None
                        self._pos = n
                        yield from self._error("JSON parse error, premature EOI")
                    return
                self._quote = None
                self._pos = end + 1
                yield from self._oversized()
                if self._depth == 0:
                    yield from self._emit(self._pos)
                continue
            yield from self._oversized()
            if self._depth > 0:
                # Inside a container only strings and brackets matter for framing; numbers,
                # keywords and separators are checked when the value is parsed.
                fast = _INNER.match(buf, self._pos)
                if fast is not None and fast.end() >= n and not eof:
                    self._pos = fast.end()
                    yield from self._oversized()
                    return
                if fast is not None:
                    self._pos = fast.end()
            sp = _SPACE.match(buf, self._pos)
            pos = sp.end() if sp else self._pos
            if pos >= n:
                self._pos = pos
                return
            ch = buf[pos]
            if ch in (0x22, 0x27):
                if self._start < 0:
                    self._start = pos
                self._quote = ch
                self._pos = pos + 1
                continue
            m = _TOKEN.match(buf, pos)
            if m is None:
                self._pos = pos + 1
                yield from self._error(f"JSON parse error, stray '{_show(bytes([ch]))}'")
                continue
            end = m.end()
            kind = m.lastgroup or ""
            if kind in ("n", "k") and end >= n and not eof:
                # A number or keyword may go on in the next chunk.
                self._pos = pos
                return
            if self._start < 0:
                self._start = m.start(kind)
            self._pos = end
            if kind == "p":
                c = buf[m.start("p")]
                if c in b"{[":
                    self._depth += 1
                    if self._depth > MAX_NESTING and not self._skipping:
                        self._skipping = True
                        yield JsonError("JSON parse error, nesting too deep")
                    continue
                if c in b"}]":
                    self._depth -= 1
                    if self._depth > 0:
                        continue
                elif self._depth > 0:
                    continue
            elif self._depth > 0:
                continue
            # A complete top-level value (or a stray delimiter) ends here.
            yield from self._emit(end)

    def _error(self, desc: str) -> Iterator[JsonError]:
        skipping = self._skipping
        self._start = -1
        self._depth = 0
        self._skipping = False
        if not skipping:
            yield JsonError(desc)

    def _emit(self, end: int) -> Iterator[Any | JsonError]:
        if self._skipping:
            self._start = -1
            self._depth = 0
            self._skipping = False
            return
        raw = bytes(self._buf[self._start : end])
        self._start = -1
        self._depth = 0
        yield parse_value(raw)


def _show(ch: bytes) -> str:
    try:
        return ch.decode()
    except UnicodeDecodeError:
        return f"\\x{ch[0]:02x}"


#: A ``\\u`` escape in the surrogate range: json.loads would accept a lone one, QEMU refuses it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_value(raw: bytes) -> Any | JsonError:
    """Parse one complete value in QEMU's dialect, or say why it is malformed."""
    if b"'" not in raw and _SURROGATE_ESCAPE.search(raw) is None:
        try:
            return json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            pass
    try:
        return _Parser(raw).parse()
    except _SyntaxError as exc:
        return JsonError(f"JSON parse error, {exc}")


def _no_constant(name: str) -> Any:
    raise ValueError(name)


class _SyntaxError(Exception):
    pass


class _Parser:
    """Recursive descent over tokens, with json-parser.c's messages."""

    def __init__(self, raw: bytes) -> None:
        self.tokens: list[tuple[str, bytes]] = []
        pos = 0
        while True:
            sp = _SPACE.match(raw, pos)
            pos = sp.end() if sp else pos
            if pos >= len(raw):
                break
            m = _TOKEN.match(raw, pos)
            if m is None:
                raise _SyntaxError(f"stray '{_show(raw[pos : pos + 1])}'")
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0
        self.depth = 0

    def parse(self) -> Any:
        value = self.value()
        return value

    def next(self) -> tuple[str, bytes] | None:
        if self.i < len(self.tokens):
            tok = self.tokens[self.i]
            self.i += 1
            return tok
        return None

    def peek(self) -> tuple[str, bytes] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def value(self) -> Any:
        tok = self.next()
        if tok is None:
            raise _SyntaxError("premature EOI")
        kind, text = tok
        if kind == "p":
            if text == b"{":
                return self.obj()
            if text == b"[":
                return self.arr()
            raise _SyntaxError("expecting value")
        if kind == "s":
            return _decode_string(text)
        if kind == "n":
            if re.fullmatch(rb"-?[0-9]+", text):
                return int(text)
            return float(text)
        if text == b"true":
            return True
        if text == b"false":
            return False
        if text == b"null":
            return None
        raise _SyntaxError(f"invalid keyword '{text.decode()}'")

    def obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        tok = self.peek()
        if tok == ("p", b"}"):
            self.next()
            return out
        while True:
            key = self.value()
            if not isinstance(key, str):
                raise _SyntaxError("key is not a string in object")
            tok = self.next()
            if tok != ("p", b":"):
                raise _SyntaxError("missing : in object pair")
            out[key] = self.value()
            tok = self.next()
            if tok == ("p", b"}"):
                return out
            if tok != ("p", b","):
                raise _SyntaxError("expected separator in dict")

    def arr(self) -> list[Any]:
        out: list[Any] = []
        tok = self.peek()
        if tok == ("p", b"]"):
            self.next()
            return out
        while True:
            out.append(self.value())
            tok = self.next()
            if tok == ("p", b"]"):
                return out
            if tok != ("p", b","):
                raise _SyntaxError("expected separator in list")


_ESCAPES = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}


def _decode_string(token: bytes) -> str:
    body = token[1:-1]
    out: list[str] = []
    i = 0
    n = len(body)
    while i < n:
        j = body.find(b"\\", i)
        if j < 0:
            j = n
        if j > i:
            try:
                out.append(body[i:j].decode())
            except UnicodeDecodeError:
                raise _SyntaxError("invalid UTF-8 sequence in string") from None
        if j >= n:
            break
        if j + 1 >= n:
            raise _SyntaxError("invalid escape sequence in string")
        c = body[j + 1]
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
            i = j + 2
        elif c == ord("u"):
            hexpart = body[j + 2 : j + 6]
            if not re.fullmatch(rb"[0-9a-fA-F]{4}", hexpart):
                raise _SyntaxError("invalid hex escape sequence in string")
            cp = int(hexpart, 16)
            i = j + 6
            if 0xD800 <= cp < 0xDC00 and body[i : i + 2] == b"\\u":
                lo_hex = body[i + 2 : i + 6]
                if not re.fullmatch(rb"[0-9a-fA-F]{4}", lo_hex):
                    raise _SyntaxError("invalid hex escape sequence in string")
                lo = int(lo_hex, 16)
                if 0xDC00 <= lo < 0xE000:
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                    i += 6
            if 0xD800 <= cp < 0xE000:
                # A surrogate that is not half of a pair: QEMU quotes the escape as written.
                shown = body[j:i].decode()
                raise _SyntaxError(f"{shown} is not a valid Unicode character")
            # U+0000 is accepted, as QEMU 7.2 does (it stores it as modified UTF-8).
            out.append(chr(cp))
        else:
            raise _SyntaxError("invalid escape sequence in string")
    return "".join(out)


#: A ``\\uXXXX`` escape in encoder output, not preceded by an escaped backslash.
_ESCAPE_U = re.compile(r"(?<!\\)((?:\\\\)*)\\u([0-9a-f]{4})")


def encode(message: dict[str, Any]) -> bytes:
    """One server message as QEMU writes it: compact ``", "``/``": "``, ASCII, CR LF."""
    text = json.dumps(message, ensure_ascii=True, separators=(", ", ": "))
    # QEMU spells \\u escapes with upper-case hex digits. A string holding a backslash
    # followed by "u00e9" as plain text must come back unchanged, so only real escapes
    # (an even run of backslashes before them) are rewritten.
    if "\\u" in text:
        text = _ESCAPE_U.sub(lambda m: m.group(1) + "\\u" + m.group(2).upper(), text)
    return text.encode() + b"\r\n"
