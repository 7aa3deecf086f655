"""Command line: ``blockd [--socket PATH] [--blockdev JSON]... [--pidfile PATH]
[--log-level LEVEL]``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sys
from typing import Any

from blockd import __version__
from blockd.errors import QmpError
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    heap.one_arena()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s blockd %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler])
    blockdevs = []
    for spec in args.blockdev:
        try:
            value = parse_blockdev(spec)
        except ValueError as exc:
            print(f"blockd: --blockdev: {exc}", file=sys.stderr)
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
