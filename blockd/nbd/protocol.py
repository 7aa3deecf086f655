"""NBD wire constants, header codecs and the errno map (QEMU's include/block/nbd.h and
nbd/common.c; the NBD project's doc/proto.md is the normative text).

Only the fixed-newstyle handshake exists here: oldstyle is long obsolete and QEMU 7.2 neither
serves nor accepts it. Every multi-byte field is big-endian.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

# -- handshake ---------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
CLISERV_MAGIC = 0x00420281861253  # oldstyle only, recognised by the client to refuse it

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = FLAG_FIXED_NEWSTYLE
FLAG_C_NO_ZEROES = FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- transmission flags (per export) -----------------------------------------------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# -- transmission ------------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_NAMES = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disconnect",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_CACHE: "cache",
    CMD_WRITE_ZEROES: "write-zeroes",
    CMD_BLOCK_STATUS: "block-status",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# -- metadata contexts -------------------------------------------------------------------
CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"
CONTEXT_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

# -- limits ------------------------------------------------------------------------------
#: Largest READ/WRITE payload either side accepts (QEMU's NBD_MAX_BUFFER_SIZE).
MAX_BUFFER_SIZE = 32 * 1024 * 1024
#: Longest export name or description (NBD_MAX_STRING_SIZE).
MAX_STRING_SIZE = 4096
#: Most extents one BLOCK_STATUS chunk carries (1 MiB of descriptors, as QEMU).
MAX_BLOCK_STATUS_EXTENTS = 1024 * 1024 // 8
#: Default TCP port.
DEFAULT_PORT = 10809

# -- errors ------------------------------------------------------------------------------
NBD_SUCCESS = 0
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

_TO_WIRE = {
    errno.EPERM: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}
_FROM_WIRE = {
    NBD_EPERM: errno.EPERM,
    NBD_EIO: errno.EIO,
    NBD_ENOMEM: errno.ENOMEM,
    NBD_EINVAL: errno.EINVAL,
    NBD_ENOSPC: errno.ENOSPC,
    NBD_EOVERFLOW: errno.EOVERFLOW,
    NBD_ENOTSUP: errno.ENOTSUP,
    NBD_ESHUTDOWN: errno.ESHUTDOWN,
}


def errno_to_nbd(err: int) -> int:
    """Host errno → NBD error; anything without an NBD spelling is EINVAL (QEMU's rule)."""
    return _TO_WIRE.get(err, NBD_EINVAL)


def nbd_to_errno(err: int) -> int:
    """NBD error → host errno; unknown codes are EINVAL, as the spec tells clients to do."""
    return _FROM_WIRE.get(err, errno.EINVAL)


# -- codecs ------------------------------------------------------------------------------
OPTION_HEADER = struct.Struct(">QII")  # magic, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle(cookie), offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
#: A chunk header with the offset that starts OFFSET_DATA and OFFSET_HOLE payloads, and the
#: hole's length: one pack (and one send) per chunk on the read path.
DATA_CHUNK_HEADER = struct.Struct(">IHHQIQ")
HOLE_CHUNK = struct.Struct(">IHHQIQI")
EXPORT_INFO = struct.Struct(">HQH")  # NBD_INFO_EXPORT: type, size, flags
BLOCK_SIZE_INFO = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE: type, min, preferred, max
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
EXTENT = struct.Struct(">II")


@dataclass(slots=True)
class Request:
    """One transmission-phase request header."""

    flags: int
    type: int
    handle: int
    offset: int
    length: int


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot go on."""


def option_reply(option: int, rtype: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPT_REPLY_MAGIC, option, rtype, len(payload)) + payload


def chunk(flags: int, rtype: int, handle: int, payload_len: int) -> bytes:
    """Header of a structured reply chunk whose payload (of *payload_len* bytes) follows."""
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, handle, payload_len)


def data_chunk_header(flags: int, handle: int, offset: int, data_len: int) -> bytes:
    """Header and offset of an OFFSET_DATA chunk whose *data_len* bytes follow."""
    return DATA_CHUNK_HEADER.pack(
        STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_DATA, handle, 8 + data_len, offset
    )


def hole_chunk(flags: int, handle: int, offset: int, length: int) -> bytes:
    return HOLE_CHUNK.pack(
        STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_HOLE, handle, 12, offset, length
    )


def error_chunk(handle: int, nbd_err: int, message: str = "", done: bool = True) -> bytes:
    msg = message.encode()[:4096]
    payload = U32.pack(nbd_err) + U16.pack(len(msg)) + msg
    return chunk(REPLY_FLAG_DONE if done else 0, REPLY_TYPE_ERROR, handle, len(payload)) + payload
