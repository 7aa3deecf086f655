"""What the stream, reopen and resize tests share: a three-image chain with data in every
layer (aligned, unaligned, zeroed over older data), the views of a daemon's graph, job events
and image headers that blockd and qemu-storage-daemon must agree on, and a raw copy of what a
chain reads."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from diffsupport import MiB, Session, norm, qcow2_node
from support import qemu_img, qemu_io

SIZE = 16 * MiB

#: ``qemu-io`` commands per layer, oldest first. mid zeroes part of base's data and writes
#: unaligned pieces; top overwrites part of mid.
LAYERS: dict[str, list[str]] = {
    "base": ["write -P 0x11 0 4M", "write -P 0x14 8M 2M", "write -P 0x15 15M 1M"],
    "mid": ["write -P 0x22 2M 4M", "write -z 8M 1M", "write -P 0x23 11272193 70001"],
    "top": ["write -P 0x33 5M 1M", "write -P 0x34 12M 64k"],
}
#: Where a stream throttled to 1 byte/s sleeps on these layers: the end of its first copied
#: 512 KiB chunk (QEMU's STREAM_CHUNK). The whole chain has data at 0; above ``base`` the
#: first data is mid's, at 2 MiB.
FIRST_STOP = {"whole": 512 * 1024, "above base": 2 * MiB + 512 * 1024}


def build_chain(d: Path, size: int = SIZE, layers: dict[str, list[str]] | None = None) -> None:
    """base <- mid <- top as qcow2 images in *d*, headers naming their backing by full
    path, each layer written as *layers* says."""
    prev: Path | None = None
    for name, cmds in (layers or LAYERS).items():
        path = d / f"{name}.qcow2"
        args = ["create", "-f", "qcow2"]
        if prev is not None:
            args += ["-b", str(prev), "-F", "qcow2"]
        qemu_img(*args, path, str(size))
        if cmds:
            qemu_io("-f", "qcow2", *[a for c in cmds for a in ("-c", c)], path)
        prev = path


def add_chain(s: Session, d: Path, read_only: tuple[str, ...] = ()) -> None:
    """blockdev-add base, mid, top (each with a named file node), each on the one below."""
    below: str | None = None
    for name in ("base", "mid", "top"):
        opts = qcow2_node(name, d / f"{name}.qcow2")
        opts["file"]["node-name"] = f"{name}-file"
        if below is not None:
            opts["backing"] = below
        if name in read_only:
            opts["read-only"] = True
        s.ok("blockdev-add", opts)
        below = name


def same_on_both(res: dict[str, Any]) -> dict[str, Any]:
    """The result of a run_both scenario once every key is the same on both daemons (the
    first difference fails the test, both values shown)."""
    a, b = res["blockd"], res["qsd"]
    for key in b:
        assert a[key] == b[key], f"{key}:\nblockd {a[key]}\nqsd    {b[key]}"
    return dict(b)


def raw_copy(path: Path, out: Path) -> bytes:
    """What the chain at *path* reads, as bytes (qemu-img convert, shared locks)."""
    qemu_img("convert", "-U", "-O", "raw", path, out)
    return out.read_bytes()


def graph(s: Session, d: Path) -> list[list[Any]]:
    """Which node backs which: name, driver, read-only, backing_file, depth, newest first.
    Generated names (``#blockNNN``, random in both daemons) read ``#block``."""
    out = []
    for n in s.ok("query-named-block-nodes"):
        depth = n["backing_file_depth"]
        name = "#block" if n["node-name"].startswith("#block") else n["node-name"]
        out.append([name, n["drv"], n["ro"], n.get("backing_file"), depth])
    return list(norm(out, d))


def node_entry(s: Session, d: Path, name: str) -> dict[str, Any]:
    """*name*'s query-named-block-nodes entry, host details (bytes the files take) left out."""

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "actual-size"}
        return obj

    for n in s.ok("query-named-block-nodes"):
        if n["node-name"] == name:
            return dict(strip(norm(n, d)))
    raise AssertionError(f"no node {name}")


def headers(d: Path, names: tuple[str, ...] = ("base", "mid", "top")) -> dict[str, Any]:
    """Each image's backing file name and format as its header has them."""
    out = {}
    for name in names:
        info = json.loads(qemu_img("info", "-U", "--output=json", d / f"{name}.qcow2").stdout)
        out[name] = [info.get("backing-filename"), info.get("backing-filename-format")]
    return dict(norm(out, d))


def allocation(path: Path) -> list[tuple[int, int, bool, bool]]:
    """The image's own allocation (no backing): (start, length, data, zero) runs."""
    res = qemu_img("map", "-U", "--output=json", "-f", "qcow2", path)
    runs = []
    for e in json.loads(res.stdout):
        if e["depth"] == 0:
            runs.append((e["start"], e["length"], e["data"], e["zero"]))
    return runs


def check_clean(d: Path, names: tuple[str, ...] = ("base", "mid", "top")) -> None:
    """``qemu-img check`` finds nothing wrong in any image (shared locks: the daemon may
    still hold them)."""
    for name in names:
        res = qemu_img("check", "-U", "--output=json", d / f"{name}.qcow2", check=False)
        assert res.returncode == 0, (name, res.stdout, res.stderr)


def job_events(s: Session) -> list[dict[str, Any]]:
    """Job events with their data, in order, timestamps dropped."""
    return [
        {"event": e["event"], "data": e.get("data")}
        for e in s.events
        if e["event"] not in ("->", "<-")
    ]


def markers(s: Session) -> list[str]:
    """Event names with the command boundaries (which events came before a reply), polls
    of query-block-jobs left out: how often a test polled is timing, not behaviour."""
    out: list[str] = []
    for m in s.names(with_markers=True):
        if out and out[-1] == "->query-block-jobs" and m.startswith("<-"):
            out.pop()
            continue
        out.append(m)
    return out


def settled_offset(s: Session, job: str, at_least: int = 1, timeout: float = 20) -> int:
    """The job's offset once it has stopped moving at *at_least* or beyond (a throttled job
    sleeping after its first copied chunk): both daemons are then compared at the same point.
    *at_least* matters on a loaded machine: qemu-storage-daemon skips unallocated chunks one
    main-loop turn each, and a pause there must not pass for the sleep."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {j["device"]: j for j in s.ok("query-block-jobs")}
        off = int(jobs[job]["offset"])
        if off != last:
            last, since = off, time.monotonic()
        elif off >= at_least and time.monotonic() - since > 0.3:
            return off
        time.sleep(0.05)
    raise AssertionError(f"offset of {job} never settled (last {last})")
