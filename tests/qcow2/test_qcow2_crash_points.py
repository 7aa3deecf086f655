"""Crash at every write: the file operations blockd's qcow2 driver makes for a workload are
recorded, and the image as a ``kill -9`` after each one would leave it (the original file
with that prefix of the operations applied) must pass ``qemu-img check`` without corruption.

Where test_qcow2_crash.py kills at random moments and found a bad order only now and then,
this walks every moment of the metadata-heavy cases deterministically: 512-byte clusters, so
that one large write needs many new refcount blocks at once, and a refcount table too small
for the image, so that it must move.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from qcow2_helpers import MiB, check_image, open_qcow2, pattern, qemu_img

from blockd.block.graph import BlockGraph

#: (offset, data, new length or None): a write, a zeroed range, or a truncate.
Op = tuple[int, bytes, int | None]


class Recorder:
    """Records what the file node is asked to change, in the order the calls return (a
    call's effect is in the file by then, so this is the order a kill could cut). Zeroing and
    discards are recorded as writes of zeroes."""

    def __init__(self, drv: Any) -> None:
        self.ops: list[Op] = []
        self._depth = 0
        for name in ("pwritev", "pwrite_zeroes", "pdiscard", "truncate"):
            setattr(drv, name, self._wrap(name, getattr(drv, name)))

    def _wrap(self, name: str, fn: Callable[..., Awaitable[None]]) -> Callable[..., Any]:
        async def call(*args: Any) -> None:
            self._depth += 1
            try:
                await fn(*args)
            finally:
                self._depth -= 1
            if self._depth:
                return  # a zeroing that fell back on pwritev: recorded once, as a zeroing
            if name == "pwritev":
                self.ops.append((args[0], bytes(args[1]), None))
            elif name == "truncate":
                self.ops.append((0, b"", args[0]))
            else:  # pwrite_zeroes, pdiscard: (offset, nbytes, ...)
                self.ops.append((args[0], bytes(args[1]), None))

        return call


def _apply(img: bytearray, op: Op) -> None:
    offset, data, length = op
    if length is not None:
        del img[length:]
        img.extend(bytes(length - len(img)))
        return
    end = offset + len(data)
    if end > len(img):
        img.extend(bytes(end - len(img)))
    img[offset:end] = data


async def _record(img: Path, work: Callable[[Any], Awaitable[None]]) -> list[Op]:
    graph = BlockGraph()
    node = await open_qcow2(graph, str(img))
    assert node.file is not None
    rec = Recorder(node.file.driver)
    await work(node)
    await graph.close_all(10)
    return rec.ops


def _check_every_prefix(tmp: Path, original: bytes, ops: list[Op]) -> int:
    img = bytearray(original)
    probe = tmp / "prefix.qcow2"
    checked = 0
    for i, op in enumerate(ops):
        _apply(img, op)
        if len(op[1]) > 64 * 1024:
            continue  # guest data: the metadata writes around it are the moments that matter
        probe.write_bytes(img)
        res = check_image(str(probe))
        assert not res.get("corruptions") and not res.get("check-errors"), (i, op[0], res)
        checked += 1
    return checked


@pytest.mark.parametrize(
    "create_opts,writes",
    [
        # one write whose clusters need 19 refcount blocks that do not exist yet
        ("cluster_size=512", [(0, 5 * MiB // 2)]),
        # 64-bit refcounts: a block covers 32 KiB, the first table 2 MiB; the writes outgrow
        # it, so it moves (and new blocks come with it) while allocations go on
        ("cluster_size=512,refcount_bits=64", [(k * 320 * 1024, 256 * 1024) for k in range(10)]),
    ],
    ids=["many-new-refcount-blocks", "refcount-table-moves"],
)
async def test_a_kill_after_any_write_leaves_no_corruption(
    tmp_path: Path, create_opts: str, writes: list[tuple[int, int]]
) -> None:
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", create_opts, img, str(8 * MiB))
    original = img.read_bytes()
    pat = pattern(7)

    async def work(node: Any) -> None:
        for off, n in writes:
            await node.write(off, memoryview(pat)[off : off + n])
        await node.flush()

    ops = await _record(img, work)
    final = bytearray(original)
    for op in ops:
        _apply(final, op)
    assert final == img.read_bytes(), "the record misses some change the driver made"
    moved = original[48:56] != bytes(final[48:56])  # the header's refcount_table_offset
    assert moved == ("refcount_bits=64" in create_opts)
    assert _check_every_prefix(tmp_path, original, ops) > 10
