"""An SFTP subsystem for the tests: OpenSSH's sftp-server behind a filter that can make it
answer as other servers do (sshd runs this as ``Subsystem sftp``; stdin and stdout are the
channel).

``--no-fsync``: ``fsync@openssh.com`` is taken out of the VERSION reply. ``--cap-read N``:
every READ asks the server for at most N bytes, so each longer read comes back short.
``--log FILE``: the most requests that were ever in flight at once is written there.
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

SERVER = "/usr/lib/openssh/sftp-server"
FXP_INIT, FXP_VERSION, FXP_READ = 1, 2, 5


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_exact(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)


def packets(fd: int) -> Iterator[bytes]:
    try:
        while True:
            (n,) = struct.unpack(">I", read_exact(fd, 4))
            yield read_exact(fd, n)
    except EOFError:
        return


def without_fsync(body: bytes) -> bytes:
    """A VERSION packet's body (type, version, extension pairs) less the fsync extension."""
    out, pos = body[:5], 5
    while pos < len(body):
        start = pos
        for _ in range(2):  # name, then data
            (n,) = struct.unpack_from(">I", body, pos)
            pos += 4 + n
        (n,) = struct.unpack_from(">I", body, start)
        if body[start + 4 : start + 4 + n] != b"fsync@openssh.com":
            out += body[start:pos]
    return out


def capped_read(body: bytes, cap: int) -> bytes:
    """A READ request (type, id, handle, offset, length) asking for at most *cap* bytes."""
    (hlen,) = struct.unpack_from(">I", body, 5)
    at = 9 + hlen + 8
    (length,) = struct.unpack_from(">I", body, at)
    return body[:at] + struct.pack(">I", min(length, cap)) + body[at + 4 :]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--cap-read", type=int, default=0)
    ap.add_argument("--log")
    args = ap.parse_args()
    proc = subprocess.Popen([SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    to_server, from_server = proc.stdin.fileno(), proc.stdout.fileno()
    lock = threading.Lock()
    inflight: set[bytes] = set()
    most = 0

    def client_to_server() -> None:
        nonlocal most
        for body in packets(0):
            if body[0] != FXP_INIT:
                with lock:
                    inflight.add(body[1:5])
                    if len(inflight) > most:
                        most = len(inflight)
                        if args.log:
                            with open(args.log, "a") as f:
                                f.write(f"{most}\n")
            if body[0] == FXP_READ and args.cap_read:
                body = capped_read(body, args.cap_read)
            write_all(to_server, struct.pack(">I", len(body)) + body)
        os.close(to_server)

    threading.Thread(target=client_to_server, daemon=True).start()
    for body in packets(from_server):
        if body[0] == FXP_VERSION:
            if args.no_fsync:
                body = without_fsync(body)
        else:
            with lock:
                inflight.discard(body[1:5])
        write_all(1, struct.pack(">I", len(body)) + body)
    sys.exit(0)


if __name__ == "__main__":
    main()
