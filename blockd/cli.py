"""Command line: ``blockd [--socket PATH] [--blockdev JSON]... [--pidfile PATH]
[--log-level LEVEL]``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys

from blockd import __version__
from blockd.errors import QmpError

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s blockd %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    blockdevs = []
    for spec in args.blockdev:
        try:
            value = json.loads(spec)
        except ValueError as exc:
            print(f"blockd: --blockdev: invalid JSON: {exc}", file=sys.stderr)
            return 1
        if not isinstance(value, dict):
            print("blockd: --blockdev: expected a JSON object", file=sys.stderr)
            return 1
        blockdevs.append(value)

    from blockd.daemon import Daemon
    from blockd.qmp.server import SocketInUseError

    async def run() -> int:
        daemon = Daemon(args.socket)
        try:
            await daemon.serve(blockdevs)
        except SocketInUseError:
            print(f"blockd: {args.socket} is in use by a running daemon", file=sys.stderr)
            return 1
        except QmpError as exc:
            print(f"blockd: --blockdev: {exc.desc}", file=sys.stderr)
            return 1
        return 0

    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    try:
        return asyncio.run(run())
    finally:
        if args.pidfile:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.pidfile)
