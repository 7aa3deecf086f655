"""The vmdk text descriptor: reading it as QEMU's block/vmdk.c does, rewriting its CID, and
writing one for ``blockdev-create``.

QEMU reads the descriptor with C string functions and ``sscanf``, so its rules are byte rules:
the text ends at the first NUL byte, a key is found by the first occurrence of its name
anywhere (comments included), and an extent line is scanned with a format whose whitespace
directives also skip newlines. Which descriptors open, and what they mean, follows from those
rules, and blockd must agree on both (an image QEMU refuses must not open here, and one that
opens must show the same disk). So this module scans the bytes with the same rules instead of
parsing "lines" in the usual way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

#: The descriptor region QEMU reads for the CID, parentCID and parentFileNameHint.
DESC_SIZE = 20 * 512
#: At most this much of a descriptor file (or of an embedded one) is parsed.
MAX_DESC = (1 << 20) - 1
#: QEMU keeps backing file names in a PATH_MAX buffer.
MAX_HINT = 4095

#: C's isspace() in the C locale.
_SPACE = b" \t\n\v\f\r"
_HEX = b"0123456789abcdefABCDEF"
_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)

#: The extent types QEMU opens; lines of other types are skipped.
OPENED_TYPES = ("FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE")
#: createType values QEMU accepts in a descriptor file.
CREATE_TYPES = (
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
)


def c_string(buf: bytes | bytearray, start: int = 0) -> bytes:
    """The bytes from *start* up to (not including) the first NUL."""
    end = buf.find(b"\0", start)
    return bytes(buf[start:] if end < 0 else buf[start:end])


def to_str(raw: bytes) -> str:
    """Descriptor bytes as a Python string (file names are bytes on the host)."""
    return raw.decode("utf-8", "surrogateescape")


# -- probing ---------------------------------------------------------------------------------
def probe_text(buf: bytes) -> bool:
    """Whether *buf* starts like a descriptor: comment lines and blank lines, then a
    ``version=1``, ``2`` or ``3`` line (QEMU's vmdk_probe for files without a magic)."""
    p, end = 0, len(buf)
    while p < end:
        c = buf[p : p + 1]
        if c == b"#":
            nl = buf.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if c == b" ":
            while p < end and buf[p : p + 1] == b" ":
                p += 1
            if p < end and buf[p : p + 1] == b"\r":
                p += 1
            if p == end or buf[p : p + 1] != b"\n":
                return False
            p += 1
            continue
        rest = buf[p : p + 11]
        for v in (b"1", b"2", b"3"):
            if rest.startswith(b"version=" + v + b"\n") or rest.startswith(
                b"version=" + v + b"\r\n"
            ):
                return True
        return False
    return False


# -- keys ------------------------------------------------------------------------------------
def quoted_value(desc: bytes, name: bytes, size: int) -> bytes | None:
    """The value of ``name="value"`` as QEMU's vmdk_parse_description finds it in a buffer
    of *size* bytes: the first occurrence of *name*, two characters skipped, up to the next
    quote. None where QEMU fails (no name, no closing quote, value too long)."""
    text = c_string(desc)
    pos = text.find(name)
    if pos < 0:
        return None
    start = pos + len(name) + 2
    if start >= len(text):
        return None
    end = text.find(b'"', start)
    if end < 0 or size < end - start + 1:
        return None
    return text[start:end]


def read_cid(region: bytes | bytearray, parent: bool) -> int | None:
    """``CID`` or ``parentCID`` from the descriptor region (QEMU's vmdk_read_cid): the first
    occurrence of the name, one more character skipped, then a hexadecimal number as
    ``sscanf("%x")`` reads it. None where QEMU fails with EINVAL."""
    buf = bytes(region[: DESC_SIZE - 1])
    name = b"parentCID" if parent else b"CID"
    text = c_string(buf)
    pos = text.find(name)
    if pos < 0:
        return None
    return _scan_hex(text, pos + len(name) + 1)


def _scan_hex(text: bytes, p: int) -> int | None:
    n = len(text)
    while p < n and text[p : p + 1] in _SPACE:
        p += 1
    neg = False
    if p < n and text[p : p + 1] in b"+-":
        neg = text[p : p + 1] == b"-"
        p += 1
    digits = b""
    if text[p : p + 1] == b"0":
        digits = b"0"
        p += 1
        if text[p : p + 1] in (b"x", b"X"):
            p += 1
    while p < n and text[p : p + 1] in _HEX:
        digits += text[p : p + 1]
        p += 1
    if not digits:
        return None
    value = min(int(digits, 16), (1 << 64) - 1)
    if neg:
        value = -value % (1 << 64)
    return value & 0xFFFFFFFF


def parent_hint(region: bytes | bytearray) -> bytes | None:
    """The ``parentFileNameHint`` value (b"" when there is none); None where QEMU's
    vmdk_parent_open fails with EINVAL (no closing quote, a name longer than PATH_MAX)."""
    buf = bytes(region[:DESC_SIZE]) + b"\0"
    text = c_string(buf)
    pos = text.find(b"parentFileNameHint")
    if pos < 0:
        return b""
    start = pos + len(b"parentFileNameHint") + 2
    # strchr() from there: up to the next NUL of the buffer, which may lie past the string.
    stop = buf.find(b"\0", start)
    quote = buf.find(b'"', start, stop if stop >= 0 else len(buf))
    if quote < 0 or quote - start > MAX_HINT:
        return None
    return buf[start:quote]


def rewrite_cid(region: bytes | bytearray, cid: int) -> bytes | None:
    """The descriptor region with a new CID, as QEMU's vmdk_write_cid leaves it: the text
    after ``CID=`` becomes the new value and a newline, followed by the text from
    ``parentCID`` on; bytes after the text's end stay. None where QEMU fails (no
    ``parentCID``)."""
    buf = bytearray(region[:DESC_SIZE].ljust(DESC_SIZE, b"\0"))
    buf[DESC_SIZE - 1] = 0
    text = c_string(buf)
    tail_at = text.find(b"parentCID")
    if tail_at < 0:
        return None
    tail = text[tail_at:]
    at = text.find(b"CID")
    if at >= 0:
        at += 4
        new = (b"%x\n" % cid + tail)[: DESC_SIZE - 1 - at] + b"\0"
        buf[at : at + len(new)] = new
    return bytes(buf)


# -- extent lines ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtentLine:
    kind: str
    sectors: int
    name: bytes
    #: Sector of the flat extent's data in its file (FLAT, VMFS); -1 otherwise.
    flat_offset: int
    line: bytes


class InvalidLine(Exception):
    """QEMU's "Invalid extent line: ..." refusal; *line* is the line as QEMU prints it."""

    def __init__(self, line: bytes) -> None:
        super().__init__(line)
        self.line = line


def extent_lines(desc: bytes) -> Iterator[ExtentLine]:
    """The extents a descriptor names, in order (QEMU's vmdk_parse_extents, plus ZERO lines).

    Each line start is scanned as QEMU's sscanf format (access word, sectors, type word,
    quoted name of at most 511 bytes, optional flat offset) scans it, over the rest of the
    text, so a line may borrow fields from the next one as it does in QEMU. Lines that are
    not ``RW`` or name a type QEMU does not open are skipped.
    ``RW <sectors> ZERO`` lines, which QEMU skips because they carry no file name, are kept:
    VMware defines them as zero-filled extents, and skipping them shifts every later extent.

    **Raises** :class:`InvalidLine` where QEMU refuses the descriptor.
    """
    text = c_string(desc)
    p = 0
    while p < len(text):
        f = _scan_line(text, p)
        nl = text.find(b"\n", p)
        line = text[p : nl if nl >= 0 else len(text)]
        p = len(text) if nl < 0 else nl + 1
        if f.count < 2 or f.access != b"RW":
            continue
        kind = f.kind.decode("latin-1")
        if f.count == 3 and kind == "ZERO":
            if f.sectors > 0:
                yield ExtentLine("ZERO", f.sectors, b"", -1, line)
            continue
        if f.count < 4:
            continue
        flat_offset = -1
        if kind == "FLAT":
            if f.count != 5 or f.offset < 0:
                raise InvalidLine(line)
            flat_offset = f.offset
        elif kind == "VMFS":
            if f.count != 4:
                raise InvalidLine(line)
            flat_offset = 0
        elif f.count != 4:
            raise InvalidLine(line)
        if f.sectors <= 0 or kind not in OPENED_TYPES:
            continue
        yield ExtentLine(kind, f.sectors, f.name, flat_offset, line)


@dataclass
class _Fields:
    """What sscanf assigned, and how many (its return value)."""

    count: int = 0
    access: bytes = b""
    sectors: int = 0
    kind: bytes = b""
    name: bytes = b""
    offset: int = -1


def _skip_space(text: bytes, p: int) -> int:
    while p < len(text) and text[p : p + 1] in _SPACE:
        p += 1
    return p


def _scan_word(text: bytes, p: int, width: int) -> tuple[bytes, int] | None:
    p = _skip_space(text, p)
    q = p
    while q < len(text) and q - p < width and text[q : q + 1] not in _SPACE:
        q += 1
    return (text[p:q], q) if q > p else None


def _scan_int(text: bytes, p: int) -> tuple[int, int] | None:
    p = _skip_space(text, p)
    q = p
    if text[q : q + 1] in (b"+", b"-"):
        q += 1
    d = q
    while q < len(text) and text[q : q + 1] in b"0123456789":
        q += 1
    if q == d:
        return None
    value = min(max(int(text[p:q]), _INT64_MIN), _INT64_MAX)
    return value, q


def _scan_line(text: bytes, p: int) -> _Fields:
    f = _Fields()
    word = _scan_word(text, p, 10)
    if word is None:
        return f
    f.access, f.count = word[0], 1
    num = _scan_int(text, word[1])
    if num is None:
        return f
    f.sectors, f.count = num[0], 2
    word = _scan_word(text, num[1], 10)
    if word is None:
        return f
    f.kind, f.count = word[0], 3
    p = _skip_space(text, word[1])
    if text[p : p + 1] != b'"':
        return f
    p += 1
    q = p
    while q < len(text) and q - p < 511 and text[q : q + 1] not in b'\n\r"':
        q += 1
    if q == p:
        return f
    f.name, f.count = text[p:q], 4
    if text[q : q + 1] != b'"':
        return f
    num = _scan_int(text, q + 1)
    if num is not None:
        f.offset, f.count = num[0], 5
    return f


# -- writing ---------------------------------------------------------------------------------
def render(
    *,
    cid: int,
    parent_cid: int,
    create_type: str,
    parent_line: str,
    extent_lines_text: str,
    hw_version: str,
    size: int,
    heads: int,
    adapter_type: str,
    tools_version: str,
) -> bytes:
    """A descriptor as ``qemu-img create -f vmdk`` writes it (QEMU's vmdk_co_do_create)."""
    cylinders = size // (63 * heads * 512)
    text = (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid:x}\n"
        f"parentCID={parent_cid:x}\n"
        f'createType="{create_type}"\n'
        f"{parent_line}"
        "\n"
        "# Extent description\n"
        f"{extent_lines_text}"
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        f'ddb.virtualHWVersion = "{hw_version}"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        f'ddb.geometry.heads = "{heads}"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.adapterType = "{adapter_type}"\n'
        f'ddb.toolsVersion = "{tools_version}"\n'
    )
    return text.encode("utf-8", "surrogateescape")
