"""Command line: ``blockd [--socket PATH] [--blockdev JSON]... [--pidfile PATH]
[--log-level LEVEL]``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from blockd import __version__
from blockd.io import heap
from blockd.logfmt import OneLineFormatter

DEFAULT_SOCKET = "/tmp/blockd.sock"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="blockd", description="Block-job daemon speaking QEMU's QMP on a Unix socket."
    )
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="QMP socket path (default %(default)s)")
    p.add_argument(
        "--blockdev",
        action="append",
        default=[],
        metavar="JSON",
        help="open a node at start, same JSON as blockdev-add (repeatable)",
    )
    p.add_argument("--pidfile", help="write the daemon's pid here")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="stderr log level (default %(default)s)",
    )
    p.add_argument("-V", "--version", action="version", version=f"blockd {__version__}")
    return p.parse_args(argv)


def _keyval_value(text: str) -> Any:
    if text in ("on", "true"):
        return True
    if text in ("off", "false"):
        return False
    try:
        return int(text, 0)
    except ValueError:
        return text


def parse_blockdev(spec: str) -> dict[str, Any]:
    """``--blockdev`` takes JSON, or QEMU's dotted ``key=value,file.filename=x`` form
    (``,,`` stands for a literal comma), as qemu-storage-daemon does."""
    if spec.lstrip().startswith("{"):
        try:
            value = json.loads(spec)
        except ValueError as exc:
            raise ValueError(f"invalid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        return value
    out: dict[str, Any] = {}
    for item in re.split(r"(?<!,),(?!,)", spec):
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got '{item}'")
        cur = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"'{key}' conflicts with an earlier value")
            cur = nxt
        cur[parts[-1]] = _keyval_value(val.replace(",,", ","))
    return out


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the daemon on uvloop: its event loop and transports are C (libuv), which moved
    NBD writes from 0.7 to about 1.5 times qemu-storage-daemon's and ssh writes by a
    tenth. ``BLOCKD_LOOP=asyncio`` runs the standard loop instead (to tell the two apart
    when something behaves differently)."""
    if os.environ.get("BLOCKD_LOOP") == "asyncio":
        return asyncio.run(main)
    import uvloop

    return uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    heap.one_arena()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s blockd %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler])
    # A client that hangs up mid-reply must cost an EPIPE on that connection, not the daemon.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    blockdevs = []
    for spec in args.blockdev:
        try:
            value = parse_blockdev(spec)
        except ValueError as exc:
            print(f"blockd: --blockdev: {exc}", file=sys.stderr)
            return 1
        blockdevs.append((spec, value))

    from blockd.daemon import BlockdevOpenError, Daemon
    from blockd.pidfile import PidFile, PidFileError
    from blockd.qmp.server import SocketInUseError, SocketPathError

    async def run() -> int:
        daemon = Daemon(args.socket)
        try:
            await daemon.serve([value for _spec, value in blockdevs])
        except SocketInUseError:
            print(f"blockd: {args.socket} is in use by a running daemon", file=sys.stderr)
            return 1
        except SocketPathError as exc:
            print(f"blockd: --socket: {exc}", file=sys.stderr)
            return 1
        except BlockdevOpenError as exc:
            # QEMU's form: the option as typed, the error, then the hint on its own line.
            spec = blockdevs[exc.index][0]
            print(f"blockd: --blockdev {spec}: {exc.error.desc}", file=sys.stderr)
            if exc.error.hint:
                print(exc.error.hint, file=sys.stderr)
            return 1
        return 0

    pidfile = None
    if args.pidfile:
        try:
            # Before the socket: a pid file held by a running daemon means touching nothing.
            pidfile = PidFile.acquire(args.pidfile)
        except PidFileError as exc:
            print(f"blockd: cannot create PID file: {exc}", file=sys.stderr)
            return 1
    try:
        return run_loop(run())
    finally:
        if pidfile is not None:
            pidfile.release()
