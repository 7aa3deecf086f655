"""The NBD handshake: fixed-newstyle option haggling for one connection (the negotiation half
of QEMU's nbd/server.c).

:class:`Handshake` reads options until the client picks an export (``NBD_OPT_GO`` or
``NBD_OPT_EXPORT_NAME``) or hangs up, and keeps what was agreed on (structured replies, the
selected metadata contexts, the block size the client accepted) for the transmission phase.
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING

from blockd.nbd import protocol as P
from blockd.nbd.export import NbdExport

if TYPE_CHECKING:
    from blockd.nbd.transmission import NbdConnection

#: Longest option payload accepted in the handshake; longer ones end the connection.
MAX_OPTION_LENGTH = 64 * 1024
#: A client that has not sent its flags after this long is dropped: a silent peer holds a
#: connection slot for nothing (the whole handshake gets HANDSHAKE_TIMEOUT).
SILENT_TIMEOUT = 5.0


class Handshake:
    """One connection's negotiation state and the option handlers."""

    def __init__(self, conn: NbdConnection) -> None:
        self.conn = conn
        self.structured = False
        self.fixed = True
        self.no_zeroes = False
        #: Selected metadata contexts (id, name) and the export they were selected for.
        self.meta: list[tuple[int, str]] = []
        self.meta_export: NbdExport | None = None
        #: Alignment the client agreed to through NBD_INFO_BLOCK_SIZE (0: none).
        self.check_align = 0

    async def _read(self, n: int) -> bytes:
        return await self.conn.reader.readexactly(n)

    def _reply(self, opt: int, rtype: int, payload: bytes = b"") -> None:
        self.conn.write(P.option_reply(opt, rtype, payload))

    def _error(self, opt: int, rtype: int, message: str) -> None:
        self.conn.log.debug("option %d refused: %s", opt, message)
        self._reply(opt, rtype, message.encode())

    async def run(self) -> NbdExport | None:
        """Fixed-newstyle negotiation; returns the export to serve, or None to hang up."""
        self.conn.write(
            P.U64.pack(P.NBDMAGIC)
            + P.U64.pack(P.IHAVEOPT)
            + P.U16.pack(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
        )
        await self.conn.drain()
        (cflags,) = P.U32.unpack(await asyncio.wait_for(self._read(4), SILENT_TIMEOUT))
        if cflags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            raise P.ProtocolError(f"unknown client flags {cflags:#x}")
        self.fixed = bool(cflags & P.FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = P.OPTION_HEADER.unpack(await self._read(P.OPTION_HEADER.size))
            if magic != P.IHAVEOPT:
                raise P.ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise P.ProtocolError(f"option {opt} too long ({length} bytes)")
            data = await self._read(length) if length else b""
            if self.conn.closed:
                return None
            if not self.fixed and opt != P.OPT_EXPORT_NAME:
                raise P.ProtocolError(f"option {opt} without fixed newstyle")
            if opt == P.OPT_EXPORT_NAME:
                return self._opt_export_name(data)
            if opt == P.OPT_ABORT:
                self._reply(opt, P.REP_ACK)
                await self.conn.drain()
                return None
            if opt == P.OPT_LIST:
                self._opt_list(data)
            elif opt in (P.OPT_INFO, P.OPT_GO):
                export = self._opt_info_go(opt, data)
                if export is not None:
                    await self.conn.drain()
                    return export
            elif opt == P.OPT_STRUCTURED_REPLY:
                if data:
                    self._error(opt, P.REP_ERR_INVALID, "option 'structured reply' has a payload")
                elif self.structured:
                    self._error(opt, P.REP_ERR_INVALID, "structured reply already negotiated")
                else:
                    self.structured = True
                    self._reply(opt, P.REP_ACK)
            elif opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
                self._opt_meta_context(opt, data)
            elif opt == P.OPT_STARTTLS:
                self._error(opt, P.REP_ERR_POLICY, "TLS not configured")
            else:
                self._error(opt, P.REP_ERR_UNSUP, f"Unsupported option {opt}")
            await self.conn.drain()

    def _find_export(self, opt: int, raw: bytes) -> NbdExport | None:
        """The export named *raw*; when there is none, refuse *opt* with QEMU's text (for
        NBD_OPT_EXPORT_NAME, which has no error reply, the caller hangs up instead)."""
        name = raw.decode("utf-8", "replace")
        export = self.conn.server.service.export_by_name(name)
        if export is None and opt != P.OPT_EXPORT_NAME:
            self._error(opt, P.REP_ERR_UNKNOWN, f"export '{name}' not present")
        return export

    def _enter(self, export: NbdExport) -> NbdExport | None:
        if self.meta_export is not export:
            self.meta = []
        return self.conn.enter(export)

    def _opt_export_name(self, data: bytes) -> NbdExport | None:
        export = self._find_export(P.OPT_EXPORT_NAME, data)
        if export is None:
            raise P.ProtocolError(f"export {data[:100]!r} not present")
        flags = export.transmission_flags(self.structured)
        self.conn.write(P.U64.pack(export.size) + P.U16.pack(flags))
        if not self.no_zeroes:
            self.conn.write(bytes(124))
        return self._enter(export)

    def _opt_list(self, data: bytes) -> None:
        if data:
            self._error(P.OPT_LIST, P.REP_ERR_INVALID, "no payload expected in option 'list'")
            return
        for exp in self.conn.server.service.nbd_exports():
            name = exp.name.encode()
            desc = (exp.description or "").encode()
            self._reply(P.OPT_LIST, P.REP_SERVER, P.U32.pack(len(name)) + name + desc)
        self._reply(P.OPT_LIST, P.REP_ACK)

    def _opt_info_go(self, opt: int, data: bytes) -> NbdExport | None:
        if len(data) < 6:
            self._error(opt, P.REP_ERR_INVALID, "option payload too short")
            return None
        (namelen,) = P.U32.unpack_from(data, 0)
        if namelen > P.MAX_STRING_SIZE or 4 + namelen + 2 > len(data):
            self._error(opt, P.REP_ERR_INVALID, "bad length received")
            return None
        name = data[4 : 4 + namelen]
        (nreq,) = P.U16.unpack_from(data, 4 + namelen)
        if 4 + namelen + 2 + 2 * nreq != len(data):
            self._error(opt, P.REP_ERR_INVALID, "bad length received")
            return None
        requests = {P.U16.unpack_from(data, 6 + namelen + 2 * i)[0] for i in range(nreq)}
        export = self._find_export(opt, name)
        if export is None:
            return None
        if P.INFO_NAME in requests:
            self._reply(opt, P.REP_INFO, P.U16.pack(P.INFO_NAME) + export.name.encode())
        if P.INFO_DESCRIPTION in requests and export.description:
            self._reply(
                opt, P.REP_INFO, P.U16.pack(P.INFO_DESCRIPTION) + export.description.encode()
            )
        want_bs = P.INFO_BLOCK_SIZE in requests
        align = export.node.driver.limits.request_alignment or 1
        min_bs = align if (opt == P.OPT_INFO or want_bs) else 1
        max_t = export.node.driver.limits.max_transfer or P.MAX_BUFFER_SIZE
        self._reply(
            opt,
            P.REP_INFO,
            P.BLOCK_SIZE_INFO.pack(
                P.INFO_BLOCK_SIZE, min_bs, max(4096, min_bs), min(max_t, P.MAX_BUFFER_SIZE)
            ),
        )
        flags = export.transmission_flags(self.structured)
        self._reply(opt, P.REP_INFO, P.EXPORT_INFO.pack(P.INFO_EXPORT, export.size, flags))
        if opt == P.OPT_GO and not want_bs and align > 1:
            self._error(
                opt, P.REP_ERR_BLOCK_SIZE_REQD, "request NBD_INFO_BLOCK_SIZE to use this export"
            )
            return None
        self._reply(opt, P.REP_ACK)
        if opt == P.OPT_GO:
            self.check_align = align if want_bs and align > 1 else 0
            return self._enter(export)
        return None

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        is_set = opt == P.OPT_SET_META_CONTEXT
        if is_set and not self.structured:
            self._error(
                opt,
                P.REP_ERR_INVALID,
                "request option 'set meta context' when structured reply is not negotiated",
            )
            return
        try:
            pos = 0
            (namelen,) = P.U32.unpack_from(data, pos)
            pos += 4
            if namelen > P.MAX_STRING_SIZE or pos + namelen + 4 > len(data):
                raise ValueError
            name = data[pos : pos + namelen]
            pos += namelen
            (nq,) = P.U32.unpack_from(data, pos)
            pos += 4
            queries: list[str] = []
            for _ in range(nq):
                (qlen,) = P.U32.unpack_from(data, pos)
                pos += 4
                if qlen > P.MAX_STRING_SIZE or pos + qlen > len(data):
                    raise ValueError
                queries.append(data[pos : pos + qlen].decode("utf-8", "replace"))
                pos += qlen
            if pos != len(data):
                raise ValueError
        except (ValueError, struct.error):
            self._error(opt, P.REP_ERR_INVALID, "bad length received")
            return
        export = self._find_export(opt, name)
        if export is None:
            return
        offered = export.contexts()
        chosen: list[int] = []
        if not queries and not is_set:
            chosen = list(range(len(offered)))
        for q in queries:
            for i, ctx in enumerate(offered):
                if i in chosen:
                    continue
                if ctx == q or (not is_set and _list_match(q, ctx)):
                    chosen.append(i)
        chosen.sort()
        if is_set:
            self.meta = [(i, offered[i]) for i in chosen]
            self.meta_export = export
        for i in chosen:
            # Ids only mean something for SET; LIST answers 0 (as QEMU and the spec allow).
            cid = i if is_set else 0
            self._reply(opt, P.REP_META_CONTEXT, P.U32.pack(cid) + offered[i].encode())
        self._reply(opt, P.REP_ACK)


def _list_match(query: str, ctx: str) -> bool:
    """NBD_OPT_LIST_META_CONTEXT wildcards: a namespace (``base:``, ``qemu:``) or a leaf
    prefix (``qemu:dirty-bitmap:``) lists every context under it."""
    if query in ("base:", "qemu:") or query == P.CONTEXT_DIRTY_BITMAP_PREFIX:
        return ctx.startswith(query)
    return False
