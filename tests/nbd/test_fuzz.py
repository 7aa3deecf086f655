"""A seeded raw-socket fuzzer: malformed handshakes, options and requests on many
connections. The daemon must stay up, a well-behaved client working alongside must keep
getting correct answers, and nothing may be logged as an internal error."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nbdtest import RawNbd, add_raw, daemon, make_raw

from blockd.nbd import protocol as P

SEED = 20240607
CASES = 1200
MiB = 1 << 20


def _greeting_case(rnd: random.Random) -> bytes:
    kind = rnd.randrange(4)
    if kind == 0:
        return rnd.randbytes(rnd.randrange(0, 4))  # truncated client flags
    if kind == 1:
        return struct.pack(">I", rnd.getrandbits(32))  # unknown client flags
    if kind == 2:
        return struct.pack(">I", 0) + rnd.randbytes(rnd.randrange(1, 64))  # not fixed newstyle
    return struct.pack(">I", 3) + rnd.randbytes(rnd.randrange(1, 200))  # garbage options


def _option(rnd: random.Random) -> bytes:
    opt = rnd.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 99, rnd.getrandbits(32)])
    shape = rnd.randrange(6)
    name = rnd.choice([b"", b"src", b"nope", rnd.randbytes(rnd.randrange(0, 40))])
    if shape == 0:  # well-formed INFO/GO-shaped payload with random requests
        nreq = rnd.randrange(0, 6)
        data = (
            struct.pack(">I", len(name))
            + name
            + struct.pack(">H", nreq)
            + b"".join(struct.pack(">H", rnd.randrange(0, 8)) for _ in range(nreq))
        )
    elif shape == 1:  # lying inner lengths
        data = struct.pack(">I", rnd.getrandbits(32)) + name + rnd.randbytes(rnd.randrange(0, 8))
    elif shape == 2:  # meta-context-shaped
        qs = [
            rnd.choice(
                [
                    b"base:",
                    b"qemu:",
                    b"base:allocation",
                    b"qemu:dirty-bitmap:",
                    rnd.randbytes(rnd.randrange(0, 30)),
                ]
            )
            for _ in range(rnd.randrange(4))
        ]
        data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(qs) + rnd.randrange(2))
        data += b"".join(struct.pack(">I", len(q)) + q for q in qs)
    elif shape == 3:
        data = rnd.randbytes(rnd.randrange(0, 300))
    elif shape == 4:  # declared length longer than what follows (connection then dropped)
        return P.OPTION_HEADER.pack(P.IHAVEOPT, opt, rnd.randrange(10, 1 << 20)) + b"x"
    else:  # bad option magic
        return struct.pack(">QII", rnd.getrandbits(64), opt, 0)
    return P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data


def _options_case(rnd: random.Random) -> bytes:
    out = struct.pack(">I", rnd.choice([1, 3]))
    for _ in range(rnd.randrange(1, 8)):
        out += _option(rnd)
    return out


def _request(rnd: random.Random, size: int) -> bytes:
    rtype = rnd.choice([0, 0, 1, 1, 3, 4, 5, 6, 7, 2, 8, 99, rnd.getrandbits(16)])
    flags = rnd.choice([0, 0, 1, 2, 4, 8, 16, rnd.getrandbits(16)])
    offset = rnd.choice([0, rnd.randrange(size), size, size - 1, rnd.getrandbits(64)])
    length = rnd.choice([0, 1, 512, 4096, rnd.randrange(1 << 20), 33 * MiB, rnd.getrandbits(32)])
    magic = P.REQUEST_MAGIC if rnd.random() < 0.9 else rnd.getrandbits(32)
    hdr = P.REQUEST.pack(magic, flags, rtype, rnd.getrandbits(64), offset, length)
    if rtype == 1:
        n = length if length <= MiB and rnd.random() < 0.7 else rnd.randrange(0, 4096)
        return hdr + rnd.randbytes(n)
    return hdr


def _transmission_prefix(structured: bool, contexts: bool) -> bytes:
    out = struct.pack(">I", 3)
    if structured:
        out += P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_STRUCTURED_REPLY, 0)
    if structured and contexts:
        q = b"base:allocation"
        data = struct.pack(">I", 4) + b"fuzz" + struct.pack(">I", 1) + struct.pack(">I", len(q)) + q
        out += P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_SET_META_CONTEXT, len(data)) + data
    data = struct.pack(">I", 4) + b"fuzz" + struct.pack(">H", 0)
    return out + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(data)) + data


def _requests_case(rnd: random.Random, size: int) -> bytes:
    out = _transmission_prefix(rnd.random() < 0.8, rnd.random() < 0.5)
    for _ in range(rnd.randrange(1, 12)):
        out += _request(rnd, size)
    return out


def _run_case(sock_path: str, payload: bytes, chunked: bool) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    try:
        s.connect(sock_path)
        if chunked:
            for i in range(0, len(payload), 7):
                s.sendall(payload[i : i + 7])
        else:
            s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        while s.recv(1 << 20):
            pass
    except (ConnectionError, BrokenPipeError, TimeoutError, OSError):
        pass
    finally:
        s.close()


def test_fuzz_never_takes_the_daemon_down(tmp_path: Path) -> None:
    image = make_raw(tmp_path / "f.raw", 8 * MiB)
    rnd = random.Random(SEED)
    size = 8 * MiB
    cases = []
    for i in range(CASES):
        kind = i % 3
        if kind == 0:
            cases.append(_greeting_case(rnd))
        elif kind == 1:
            cases.append(_options_case(rnd))
        else:
            cases.append(_requests_case(rnd, size))
    with daemon(tmp_path, "blockd") as (d, q):
        add_raw(q, "src", image)
        sock = tmp_path / "fuzz.sock"
        q.run(
            "nbd-server-start",
            {"addr": {"type": "unix", "data": {"path": str(sock)}}, "max-connections": 0},
        )
        q.run(
            "block-export-add",
            {"type": "nbd", "id": "fuzz", "node-name": "src", "name": "fuzz", "writable": True},
        )
        q.run(
            "block-export-add",
            {"type": "nbd", "id": "good", "node-name": "src", "name": "good", "writable": True},
        )
        stop = threading.Event()
        good_errors: list[BaseException] = []
        rounds = [0]

        def good_client() -> None:
            try:
                c = RawNbd(str(sock))
                c.go("good", contexts=["base:allocation"])
                off = 7 * MiB  # the fuzzer writes anywhere; the good client checks its own
                while not stop.is_set():
                    data = bytes([rounds[0] % 251]) * 4096
                    assert c.request(P.CMD_WRITE, off, 4096, payload=data)["error"] == 0
                    got = c.read(off, 4096)
                    # Fuzz writes may land here too; only a failed or short reply is a bug.
                    assert len(got) == 4096
                    r = c.request(P.CMD_BLOCK_STATUS, 0, MiB, P.CMD_FLAG_REQ_ONE)
                    assert r["error"] == 0 and r["chunks"]
                    rounds[0] += 1
                c.disconnect()
            except BaseException as exc:
                good_errors.append(exc)

        t = threading.Thread(target=good_client)
        t.start()
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda it: _run_case(str(sock), it[1], it[0] % 5 == 0), enumerate(cases)))
        stop.set()
        t.join(30)
        assert not good_errors, good_errors
        assert rounds[0] > 10
        assert time.monotonic() - started < 60
        # Still alive and answering; every fuzz connection is gone.
        exports = q.run("query-block-exports")["return"]
        assert {e["id"] for e in exports} == {"fuzz", "good"}
        time.sleep(0.3)
        q.run("block-export-del", {"id": "fuzz"})
        q.run("block-export-del", {"id": "good"})
        q.run("nbd-server-stop")
        assert d.proc.poll() is None
    log = d.log_text()
    assert "internal error" not in log and "Traceback" not in log, log[-4000:]
