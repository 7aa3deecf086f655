"""``blockd-backup``: the command line.

Commands: ``backup``, ``list``, ``verify``, ``restore``, ``serve``, ``prune``; see
docs/backup-tool.md for a walkthrough and errors.py for the exit codes. Each command runs in
one asyncio loop; ctrl-c and SIGTERM cancel it once, which lets the command clean up (a
backup removes its partial files, serve removes its exports) before the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from blockd.tools.backup.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ToolError,
)
from blockd.tools.backup.manifest import BackupDir
from blockd.tools.backup.progress import Reporter, human, make_reporter

EPILOG = """exit codes: 0 done, 1 failed (nothing half-done is left), 2 usage, 3 verify found
a difference, 4 directory in use by another command, 5 daemon unreachable, 130 interrupted"""


def size_arg(text: str) -> int:
    """A byte count, with an optional K/M/G suffix (powers of 1024)."""
    mult = 1
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blockd-backup",
        description="Incremental backups of the disks of blockd or qemu-storage-daemon.",
        epilog=EPILOG,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def daemon_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--socket", required=True, help="the daemon's QMP socket")
        sp.add_argument(
            "--busy-timeout",
            type=float,
            default=60.0,
            metavar="S",
            help="how long to wait for a monitor another client holds (default 60)",
        )

    b = sub.add_parser("backup", help="take a backup point of one or more disks")
    daemon_opts(b)
    b.add_argument(
        "--node", required=True, action="extend", nargs="+", metavar="NODE", help="disk nodes"
    )
    b.add_argument("--dir", required=True, type=Path, help="the backup directory")
    b.add_argument("--level", choices=("auto", "full", "inc"), default="auto")
    b.add_argument("--compress", action="store_true", help="compress the new layer")
    b.add_argument("--speed", type=size_arg, default=0, metavar="BYTES_PER_S")
    b.add_argument("--json", action="store_true", help="JSON events on stdout")

    ls = sub.add_parser("list", help="show the chains and points of a directory")
    ls.add_argument("dir", type=Path)
    ls.add_argument("--json", action="store_true")

    v = sub.add_parser("verify", help="check layers and checksums (not the live disk)")
    v.add_argument("dir", type=Path)
    v.add_argument("--point", type=int, help="only this point (default: every point)")
    v.add_argument("--json", action="store_true")

    r = sub.add_parser("restore", help="write one disk of a point to an image file")
    r.add_argument("dir", type=Path)
    r.add_argument("--point", type=int, required=True)
    r.add_argument("--to", type=Path, required=True, metavar="FILE")
    r.add_argument("--node", help="which disk (needed when the point has several)")
    r.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    r.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    r.add_argument("--json", action="store_true")

    s = sub.add_parser("serve", help="export a point read-only over NBD until interrupted")
    s.add_argument("dir", type=Path)
    s.add_argument("--point", type=int, required=True)
    daemon_opts(s)
    s.add_argument("--nbd", type=Path, metavar="PATH", help="start the NBD server on PATH")
    s.add_argument("--json", action="store_true")

    pr = sub.add_parser("prune", help="keep the newest N points, merging older layers")
    pr.add_argument("dir", type=Path)
    pr.add_argument("--keep", type=int, required=True, metavar="N")
    pr.add_argument("--json", action="store_true")
    return p


def list_dir(directory: Path, rep: Reporter, as_json: bool) -> int:
    bdir = BackupDir.open(directory)
    chains = bdir.chains()
    if as_json:
        doc = {
            "directory": str(directory),
            "next-point": bdir.state.next_point,
            "last-failure": bdir.state.last_failure,
            "chains": [{k: v for k, v in c.to_json().items() if k != "schema"} for c in chains],
        }
        print(json.dumps(doc, indent=1))
        return EXIT_OK
    if not chains:
        print(f"{directory}: no backup yet")
    for c in chains:
        note = "  (prune unfinished: run prune to finish it)" if c.journal else ""
        print(f"{c.path.name}: disks {', '.join(c.disks)}{note}")
        for p in c.points:
            parts = [
                f"{d}: {human(x.copied)} copied, {human(x.stored)} stored"
                for d, x in p.disks.items()
            ]
            merged = f" (merged {', '.join(map(str, p.merged))})" if p.merged else ""
            print(f"  point {p.point:<4} {p.time}  {p.level:<4}{merged}  {'; '.join(parts)}")
    failure = bdir.state.last_failure
    if failure:
        print(f"last run failed ({failure['time']}): {failure['reason']}")
    return EXIT_OK


async def dispatch(args: argparse.Namespace, rep: Reporter) -> int:
    # Each command imports what it needs: start-up time is part of every nightly run.
    if args.command == "backup":
        from blockd.tools.backup.backup import BackupOptions, backup

        opts = BackupOptions(
            socket=args.socket,
            nodes=list(dict.fromkeys(args.node)),
            dir=args.dir,
            level=args.level,
            compress=args.compress,
            speed=args.speed,
            busy_timeout=args.busy_timeout,
        )
        pt = await backup(opts, rep)
        parts = [
            f"{d} {human(x.copied)} copied, {human(x.stored)} stored" for d, x in pt.disks.items()
        ]
        rep.result(
            f"point {pt.point} done: {pt.level}, {'; '.join(parts)} in {pt.seconds:.1f} s",
            point=pt.point,
            level=pt.level,
            reason=pt.reason,
            disks={d: x.to_json() for d, x in pt.disks.items()},
        )
        return EXIT_OK
    if args.command == "list":
        return list_dir(args.dir, rep, args.json)
    if args.command == "verify":
        from blockd.tools.backup.verify import verify

        return await verify(args.dir, args.point, rep)
    if args.command == "restore":
        from blockd.tools.backup.restore import restore

        await restore(args.dir, args.point, args.to, args.node, args.format, args.force, rep)
        return EXIT_OK
    if args.command == "serve":
        from blockd.tools.backup.serve import serve

        await serve(args.dir, args.point, args.socket, args.nbd, rep, args.busy_timeout)
        return EXIT_OK
    if args.command == "prune":
        from blockd.tools.backup.prune import prune

        await prune(args.dir, args.keep, rep)
        return EXIT_OK
    raise AssertionError(args.command)


async def _main(coro: Coroutine[Any, Any, int]) -> int:
    """Run *coro*; the first SIGINT/SIGTERM cancels it (it cleans up), later ones are
    ignored so the clean-up is not cut short."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    interrupted = False

    def on_signal() -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await task
    except asyncio.CancelledError:
        if interrupted:
            return EXIT_INTERRUPTED
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    rep = make_reporter(getattr(args, "json", False))
    try:
        rc = asyncio.run(_main(dispatch(args, rep)))
    except ToolError as exc:
        if getattr(args, "json", False):
            rep.event("error", message=exc.message, code=exc.code)
        else:
            rep.note(exc.message)
        return exc.code
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
