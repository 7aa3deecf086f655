"""A Unix-socket forwarder that can hold back what its clients send: with it in front of an
NBD server, a test stops a daemon's requests to that server at a chosen moment (a backup's
copy to its target, say) and lets them go again, which makes a race deterministic."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class StallProxy:
    def __init__(self, listen: Path, upstream: Path) -> None:
        self.upstream = upstream
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(listen))
        self.server.listen(8)
        self._flowing = threading.Event()
        self._flowing.set()
        #: Bytes read from clients while paused and not yet passed on.
        self.held = 0
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def wait_held(self, timeout: float = 10.0) -> None:
        """Until a client has sent something the pause holds back."""
        deadline = time.monotonic() + timeout
        while self.held == 0:
            if time.monotonic() > deadline:
                raise AssertionError("nothing reached the paused proxy")
            time.sleep(0.01)

    def close(self) -> None:
        self.resume()
        for s in [self.server, *self._socks]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX)
            up.connect(str(self.upstream))
            self._socks += [client, up]
            threading.Thread(target=self._pump, args=(client, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, stallable: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if stallable and not self._flowing.is_set():
                    self.held += len(data)
                    self._flowing.wait()
                    self.held -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
