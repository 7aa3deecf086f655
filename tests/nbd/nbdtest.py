"""Helpers for the NBD tests: a raw-socket NBD peer with byte-level control, a QMP client that
keeps events, daemon pairs (blockd and QSD) serving the same image, and small utilities."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rawclient import RawQmp
from support import Daemon, start_blockd, start_qsd

from blockd.nbd import protocol as P


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def recvall(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)}/{n} bytes")
        buf += chunk
    return bytes(buf)


class RawNbd:
    """A synchronous NBD peer that sends exactly what it is told."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 10.0) -> None:
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX)
        else:
            self.sock = socket.socket(socket.AF_INET)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.structured = False
        self.size = 0
        self.flags = 0
        self.contexts: dict[str, int] = {}

    def close(self) -> None:
        self.sock.close()

    # -- handshake ---------------------------------------------------------------------------
    def greeting(self, cflags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES) -> int:
        data = recvall(self.sock, 18)
        assert data[:8] == b"NBDMAGIC" and data[8:16] == b"IHAVEOPT", data
        self.sock.sendall(struct.pack(">I", cflags))
        return int(struct.unpack(">H", data[16:])[0])

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = P.OPTION_REPLY_HEADER.unpack(recvall(self.sock, 20))
        assert magic == P.OPT_REPLY_MAGIC
        return opt, rtype, recvall(self.sock, length)

    def option_replies(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option and collect replies up to the final ACK or error."""
        self.option(opt, data)
        out = []
        while True:
            _o, rtype, body = self.option_reply()
            out.append((rtype, body))
            if rtype == P.REP_ACK or rtype & P.REP_FLAG_ERROR:
                return out

    @staticmethod
    def info_payload(name: str, requests: tuple[int, ...] = ()) -> bytes:
        n = name.encode()
        return (
            struct.pack(">I", len(n))
            + n
            + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests)
        )

    @staticmethod
    def meta_payload(name: str, queries: list[str]) -> bytes:
        n = name.encode()
        out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
        for q in queries:
            out += struct.pack(">I", len(q.encode())) + q.encode()
        return out

    def go(
        self, name: str, structured: bool = True, contexts: list[str] | None = None
    ) -> list[tuple[int, bytes]]:
        self.greeting()
        if structured:
            assert self.option_replies(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ACK
            self.structured = True
        if contexts:
            for rtype, body in self.option_replies(
                P.OPT_SET_META_CONTEXT, self.meta_payload(name, contexts)
            ):
                if rtype == P.REP_META_CONTEXT:
                    self.contexts[body[4:].decode()] = struct.unpack(">I", body[:4])[0]
        reps = self.option_replies(P.OPT_GO, self.info_payload(name, (P.INFO_BLOCK_SIZE,)))
        for rtype, body in reps:
            if rtype == P.REP_INFO and struct.unpack(">H", body[:2])[0] == P.INFO_EXPORT:
                _t, self.size, self.flags = P.EXPORT_INFO.unpack(body)
        return reps

    # -- transmission ------------------------------------------------------------------------
    def send(
        self,
        rtype: int,
        offset: int,
        length: int,
        flags: int = 0,
        handle: int = 1,
        payload: bytes = b"",
    ) -> None:
        self.sock.sendall(
            P.REQUEST.pack(P.REQUEST_MAGIC, flags, rtype, handle, offset, length) + payload
        )

    def reply(self, read_len: int = 0) -> dict[str, Any]:
        """One reply: simple (with *read_len* data bytes on success) or all chunks to DONE."""
        (magic,) = struct.unpack(">I", recvall(self.sock, 4))
        if magic == P.SIMPLE_REPLY_MAGIC:
            err, handle = struct.unpack(">IQ", recvall(self.sock, 12))
            data = recvall(self.sock, read_len) if read_len and not err else b""
            return {"handle": handle, "error": err, "data": data, "chunks": []}
        assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
        out: dict[str, Any] = {"error": 0, "chunks": []}
        while True:
            flags, ctype, handle, length = struct.unpack(">HHQI", recvall(self.sock, 16))
            body = recvall(self.sock, length)
            out["handle"] = handle
            out["chunks"].append((ctype, body))
            if ctype & 0x8000:
                out["error"] = struct.unpack(">I", body[:4])[0]
            if flags & P.REPLY_FLAG_DONE:
                return out
            (magic,) = struct.unpack(">I", recvall(self.sock, 4))
            assert magic == P.STRUCTURED_REPLY_MAGIC

    def request(
        self, rtype: int, offset: int, length: int, flags: int = 0, payload: bytes = b""
    ) -> dict[str, Any]:
        self.send(rtype, offset, length, flags, 7, payload)
        return self.reply(length if rtype == P.CMD_READ else 0)

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        """Read and reassemble (structured or simple); asserts success."""
        r = self.request(P.CMD_READ, offset, length, flags)
        assert r["error"] == 0, r
        if not r["chunks"]:
            return bytes(r["data"])
        buf = bytearray(length)
        for ctype, body in r["chunks"]:
            off = struct.unpack(">Q", body[:8])[0] - offset
            if ctype == P.REPLY_TYPE_OFFSET_DATA:
                buf[off : off + len(body) - 8] = body[8:]
        return bytes(buf)

    def disconnect(self) -> None:
        self.send(P.CMD_DISC, 0, 0)
        self.close()


class Qmp(RawQmp):
    """RawQmp that keeps events and can wait for them."""

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        super().__init__(path, timeout)
        self.events: list[dict[str, Any]] = []
        self.negotiate()

    def reply(self) -> dict[str, Any]:
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg
            self.events.append(msg)

    def run(self, execute: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Command → reply, failing loudly on an error reply."""
        r = self.cmd(execute, arguments)
        assert "return" in r, (execute, arguments, r)
        return r

    def transcript(
        self, execute: str, arguments: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """The events that arrive before the reply, then the reply (timestamps dropped)."""
        first = len(self.events)
        r = self.cmd(execute, arguments)
        return [_strip(e) for e in self.events[first:]] + [_strip(r)]

    def wait_event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e["event"] == name:
                    self.events.remove(e)
                    return _strip(e)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {name} event")
            self.sock.settimeout(left)
            try:
                msg = self.recv()
            finally:
                self.sock.settimeout(20.0)
            if "event" in msg:
                self.events.append(msg)

    def drain_events(self, wait: float = 0.3) -> list[dict[str, Any]]:
        """Events that arrive within *wait* seconds (and any already queued)."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                self.events.append(self.recv())
            except (TimeoutError, OSError):
                break
        self.sock.settimeout(20.0)
        out = [_strip(e) for e in self.events]
        self.events.clear()
        return out


def _strip(msg: dict[str, Any]) -> dict[str, Any]:
    m = {k: v for k, v in msg.items() if k not in ("timestamp", "id")}
    return m


@contextmanager
def daemon(tmp: Path, kind: str, *extra: str) -> Iterator[tuple[Daemon, Qmp]]:
    d = (
        start_blockd(tmp, *extra, name=f"{kind}-blockd")
        if kind == "blockd"
        else start_qsd(tmp, *extra, name=f"{kind}-qsd")
    )
    q = d.client(Qmp)
    try:
        with d.diagnosed():
            yield d, q
    finally:
        q.close()
        rc = d.stop()
        if kind == "blockd":
            assert rc == 0, d.log_text()[-3000:]


def add_raw(q: Qmp, node: str, image: Path) -> None:
    """``blockdev-add`` a raw node *node* over the file *image*."""
    q.run(
        "blockdev-add",
        {"driver": "raw", "node-name": node, "file": {"driver": "file", "filename": str(image)}},
    )


def make_raw(path: Path, size: int = 64 * 1024 * 1024, seed: int = 1) -> Path:
    """A sparse raw image with a few data extents of known content."""
    with open(path, "wb") as f:
        f.truncate(size)
        rnd = random.Random(seed)
        for off in (0, 1 << 20, 5 << 20, 5 << 20 | 1 << 16, 20 << 20):
            if off + (256 << 10) <= size:
                f.seek(off)
                f.write(rnd.randbytes(192 << 10))
    return path


def qemu_img_json(*args: str) -> Any:
    res = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def map_of(target: str, fmt: str = "raw") -> list[dict[str, Any]]:
    """``qemu-img map --output=json``, normalised to what a raw-over-NBD map can show."""
    entries = qemu_img_json("map", "--output=json", "-f", fmt, target)
    out: list[dict[str, Any]] = []
    for e in entries:
        item = {"start": e["start"], "length": e["length"], "data": e["data"], "zero": e["zero"]}
        if (
            out
            and out[-1]["data"] == item["data"]
            and out[-1]["zero"] == item["zero"]
            and (out[-1]["start"] + out[-1]["length"] == item["start"])
        ):
            out[-1]["length"] += item["length"]
        else:
            out.append(item)
    return out


def uri(sock: Path | str, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def tcp_uri(port: int, export: str) -> str:
    return f"nbd://127.0.0.1:{port}/{export}"


def wait_path(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.02)
