"""Two disks in one run are one point in time, while a writer keeps changing both.

The writer stands for a guest writing a journal on one disk and data on the other: it
numbers its writes, and write *i* goes first to a slot of disk A, then (once A acknowledged
it) to the same slot of disk B, each slot filled with the number *i*. At any instant A and B
therefore agree on every slot except at most the one being written, where A is ahead. A
backup whose disks were started at different moments shows B ahead of A, or many slots in
disagreement. Both the full run (individual completion) and the incremental run (grouped
completion) are checked, throttled so that the writer is busy during the whole copy.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from pathlib import Path

from bblab import Lab, MiB

from blockd.nbd.client import NbdClient

SLOT = 64 * 1024
SLOTS = 48
STRIDE = 2 * SLOT


def _block(i: int) -> bytes:
    return struct.pack("<Q", i) * (SLOT // 8)


class Writer(threading.Thread):
    def __init__(self, lab: Lab, start_at: int) -> None:
        super().__init__(daemon=True)
        self.lab = lab
        self.i = start_at
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._write())
        except BaseException as exc:  # reported by the test
            self.error = exc

    async def _write(self) -> None:
        a = await NbdClient.connect(("unix", str(self.lab.nbd)), "diskA")
        b = await NbdClient.connect(("unix", str(self.lab.nbd)), "diskB")
        try:
            while not self.stop.is_set():
                i = self.i + 1
                off = (i % SLOTS) * STRIDE
                await a.write(off, _block(i))
                await b.write(off, _block(i))
                self.i = i
        finally:
            await a.disconnect()
            await b.disconnect()


def _slots(path: Path) -> list[int]:
    data = path.read_bytes()
    out = []
    for s in range(SLOTS):
        chunk = data[s * STRIDE : s * STRIDE + SLOT]
        (value,) = struct.unpack_from("<Q", chunk)
        assert chunk == struct.pack("<Q", value) * (SLOT // 8), f"slot {s} is torn"
        out.append(value)
    return out


def _run_with_writer(lab: Lab, start_at: int) -> tuple[int, int]:
    writer = Writer(lab, start_at)
    writer.start()
    try:
        while writer.i < start_at + SLOTS + 20 and writer.is_alive():  # every slot written
            threading.Event().wait(0.01)
        before = writer.i
        lab.backup("--speed", "4M")
        after = writer.i
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.error is None, writer.error
    return before, after


def _check_point(lab: Lab, point: int, before: int, after: int) -> None:
    paths = {}
    for disk in ("diskA", "diskB"):
        paths[disk] = out = lab.tmp / f"p{point}-{disk}.raw"
        lab.tool("restore", lab.dir, "--point", point, "--node", disk, "--to", out)
    a, b = _slots(paths["diskA"]), _slots(paths["diskB"])
    top = max(a)
    # the point lies inside the run, while the writer was busy
    assert before <= top <= after, (before, top, after)
    assert after - before > 30, f"the writer made only {after - before} writes during the run"
    differ = [s for s in range(SLOTS) if a[s] != b[s]]
    assert len(differ) <= 1, f"point {point}: disks disagree in slots {differ}: {a} {b}"
    for s in differ:
        assert a[s] == top and b[s] < a[s], (s, a[s], b[s])


def test_two_disks_one_point_in_time(lab: Lab) -> None:
    for name in ("diskA", "diskB"):
        lab.add_disk(name, 8 * MiB, fill=4 * MiB)
    before, after = _run_with_writer(lab, 0)
    _check_point(lab, 1, before, after)
    before, after = _run_with_writer(lab, after)
    assert lab.points()[2]["level"] == "inc"
    _check_point(lab, 2, before, after)
    lab.tool("verify", lab.dir)
