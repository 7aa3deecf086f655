"""An SFTP subsystem for the tests: OpenSSH's sftp-server with ``fsync@openssh.com`` taken
out of its VERSION reply, as a server without the extension answers (sshd runs this as
``Subsystem sftp``; stdin and stdout are the channel)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading

SERVER = "/usr/lib/openssh/sftp-server"


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_exact(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            sys.exit(0)
        out += chunk
    return out


def without_fsync(body: bytes) -> bytes:
    """A VERSION packet's body (type, version, extension pairs) less the fsync extension."""
    out, pos = body[:5], 5
    while pos < len(body):
        pair_start = pos
        for _ in range(2):  # name, then data
            (n,) = struct.unpack_from(">I", body, pos)
            pos += 4 + n
        (n,) = struct.unpack_from(">I", body, pair_start)
        if body[pair_start + 4 : pair_start + 4 + n] != b"fsync@openssh.com":
            out += body[pair_start:pos]
    return out


def main() -> None:
    proc = subprocess.Popen([SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    to_server, from_server = proc.stdin.fileno(), proc.stdout.fileno()

    def client_to_server() -> None:
        while data := os.read(0, 65536):
            write_all(to_server, data)
        proc.stdin.close()  # type: ignore[union-attr]

    threading.Thread(target=client_to_server, daemon=True).start()
    (n,) = struct.unpack(">I", read_exact(from_server, 4))
    body = without_fsync(read_exact(from_server, n))
    write_all(1, struct.pack(">I", len(body)) + body)
    while data := os.read(from_server, 65536):
        write_all(1, data)


if __name__ == "__main__":
    main()
