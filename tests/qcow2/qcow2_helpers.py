"""Shared helpers of the qcow2 tests: opening images through blockd's graph, running qemu-img,
and a seeded random workload with a shadow model of what each operation must leave behind.

The model of discard and write-zeroes follows QEMU's qcow2 semantics, which blockd copies:
write-zeroes always reads back as zeroes; discard turns the whole clusters inside its range
(plus the partial last cluster when the range reaches the end of the image) into zeroes, leaves
partial clusters alone, and does nothing at all on a v2 image with a backing file (QEMU refuses
that case, since without the zero flag it would expose the backing file's data). So the shadow
is exact everywhere and ``qemu-img compare`` can check every byte.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from typing import Any

import support
from support import qemu_img as qemu_img

from blockd.block.driver import WriteFlags
from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode
from blockd.qapi.base import ArgsValidator
from blockd.qapi.block import BlockdevOptions

MiB = 1024 * 1024


def qemu_io(path: str, *cmds: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, path], capture_output=True, text=True, check=True)


def backed_qcow2(
    tmp_path: Any, size: str, base_io: tuple[str, ...] = (), top_io: tuple[str, ...] = ()
) -> tuple[str, str]:
    """``base.qcow2`` (qemu-io commands *base_io* run on it) and ``top.qcow2`` over it (then
    *top_io*), both *size* long; returns their paths."""
    base = str(tmp_path / "base.qcow2")
    img = str(tmp_path / "top.qcow2")
    qemu_img("create", "-f", "qcow2", base, size)
    if base_io:
        qemu_io(base, *base_io)
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", img, size)
    if top_io:
        qemu_io(img, *top_io)
    return base, img


def check_image(path: str) -> dict[str, Any]:
    """``qemu-img check --output=json``; exit code 0 = clean, 3 = leaks only."""
    out = support.check_image(path)
    assert out["rc"] in (0, 2, 3), out
    return out


def to_raw(path: str, out: str) -> bytes:
    """The guest view of *path* as qemu-img sees it; *out* is scratch, removed afterwards
    because disk is scarce on CI machines."""
    qemu_img("convert", "-O", "raw", path, out)
    try:
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def options(spec: dict[str, Any]) -> Any:
    return ArgsValidator(BlockdevOptions).validate(spec)


async def open_qcow2(
    graph: BlockGraph, path: str, *, rw: bool = True, name: str = "q", **extra: Any
) -> BlockNode:
    spec: dict[str, Any] = {
        "driver": "qcow2",
        "node-name": name,
        "read-only": not rw,
        "discard": "unmap",
        "file": {"driver": "file", "filename": path, "discard": "unmap"},
    }
    spec.update(extra)
    return await graph.add(options(spec))


@dataclass
class Op:
    kind: str  # "w" write, "z" write-zeroes, "d" discard
    offset: int
    length: int
    src: int = 0  # offset into the pattern buffer (writes)
    unmap: bool = False

    def line(self) -> str:
        return f"{self.kind} {self.offset} {self.length} {self.src} {int(self.unmap)}"

    @classmethod
    def parse(cls, text: str) -> Op:
        k, o, n, s, u = text.split()
        return cls(k, int(o), int(n), int(s), bool(int(u)))


def pattern(seed: int, size: int = 8 * MiB) -> bytes:
    return random.Random(seed).randbytes(size)


def random_ops(rng: random.Random, size: int, count: int, max_len: int = 4 * MiB) -> list[Op]:
    """Sizes log-uniform from 1 byte to *max_len*, offsets anywhere (mostly unaligned)."""
    ops = []
    for _ in range(count):
        length = min(size, max(1, int(2 ** rng.uniform(0, max_len.bit_length() - 1))))
        if rng.random() < 0.2:
            length = rng.choice([512, 4096, 65536, 2 * MiB]) * rng.randint(1, 2)
            length = min(length, size)
        offset = rng.randrange(0, size - length + 1)
        if rng.random() < 0.2:
            offset -= offset % 512
        r = rng.random()
        kind = "w" if r < 0.7 else "z" if r < 0.85 else "d"
        ops.append(Op(kind, offset, length, rng.randrange(0, 4 * MiB), rng.random() < 0.5))
    return ops


class Shadow:
    """What the image must read as after the ops, per the module docstring's rules."""

    def __init__(self, initial: bytes, cluster_size: int, version: int, has_backing: bool):
        self.data = bytearray(initial)
        self.cs = cluster_size
        self.version = version
        self.has_backing = has_backing

    def apply(self, op: Op, pat: bytes) -> None:
        end = op.offset + op.length
        if op.kind == "w":
            self.data[op.offset : end] = pat[op.src : op.src + op.length]
        elif op.kind == "z":
            self.data[op.offset : end] = bytes(op.length)
        else:
            if self.version < 3 and self.has_backing:
                return
            size = len(self.data)
            a0 = -(-op.offset // self.cs) * self.cs
            a1 = end // self.cs * self.cs
            if end >= size and end % self.cs:
                a1 = size
            if a0 < a1:
                self.data[a0:a1] = bytes(a1 - a0)


async def apply_op(node: BlockNode, op: Op, pat: bytes) -> None:
    if op.kind == "w":
        await node.write(op.offset, memoryview(pat)[op.src : op.src + op.length])
    elif op.kind == "z":
        await node.write_zeroes(
            op.offset, op.length, WriteFlags.MAY_UNMAP if op.unmap else WriteFlags.NONE
        )
    else:
        await node.discard(op.offset, op.length)


def batches(ops: list[Op], rng: random.Random, max_batch: int = 4) -> list[list[Op]]:
    """Group consecutive ops into batches whose ranges do not overlap, so running a batch
    concurrently gives the same result as running it in order."""
    out: list[list[Op]] = []
    cur: list[Op] = []
    want = rng.randint(1, max_batch)
    for op in ops:
        clash = any(
            op.offset < o.offset + o.length and o.offset < op.offset + op.length for o in cur
        )
        if clash or len(cur) >= want:
            out.append(cur)
            cur = []
            want = rng.randint(1, max_batch)
        cur.append(op)
    if cur:
        out.append(cur)
    return out
