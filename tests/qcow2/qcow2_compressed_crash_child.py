"""Child process of the compressed-write crash test: compressed writes into clusters without
host space, normal partial writes over compressed clusters and discards, through blockd's
graph, until it is killed with SIGKILL.

Protocol on stdout (as qcow2_crash_child.py): ``READY``; ``B <op>;<op>;…`` before a batch is
issued, each op ``kind cluster tag`` (``c`` compressed cluster, ``w`` normal write inside the
cluster, ``d`` discard of the cluster); ``F <n>`` after a flush that followed batch *n*.

Usage: qcow2_compressed_crash_child.py IMAGE SEED
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # support

from qcow2_helpers import open_qcow2

from blockd.block.driver import WriteFlags
from blockd.block.graph import BlockGraph

OFFSET_MASK = 0x00FFFFFFFFFFFE00


def cluster_data(cs: int, cluster: int, tag: int) -> bytes:
    """What a ``c`` op writes: incompressible, repetitive or half-and-half data."""
    rng = random.Random(tag)
    kind = tag % 3
    if kind == 0:
        return rng.randbytes(cs)
    if kind == 1:
        return ((b"%d:%d," % (cluster, tag)) * cs)[:cs]
    return rng.randbytes(cs // 2) + bytes(cs - cs // 2)


def write_range(cs: int, cluster: int, tag: int) -> tuple[int, bytes]:
    """Offset and data of a ``w`` op: a piece of the cluster."""
    start = tag % cs
    n = 1 + (tag >> 20) % (cs - start)
    return cluster * cs + start, random.Random(tag).randbytes(n)


async def run_op(node, cs: int, kind: str, cluster: int, tag: int) -> None:
    if kind == "c":
        await node.write(cluster * cs, cluster_data(cs, cluster, tag), WriteFlags.COMPRESSED)
    elif kind == "w":
        off, data = write_range(cs, cluster, tag)
        await node.write(off, data)
    else:
        await node.discard(cluster * cs, cs)


async def main(path: str, seed: int) -> None:
    rng = random.Random(seed)
    graph = BlockGraph()
    node = await open_qcow2(graph, path)
    cs = node.driver.cluster_size
    n = node.length // cs
    print("READY", flush=True)
    b = 0
    while True:
        ents = await node.driver.map.entries_span(0, n)
        ops = []
        for c in rng.sample(range(n), rng.randint(1, 6)):
            r = rng.random()
            if not ents[c] & OFFSET_MASK and r < 0.75:
                ops.append(("c", c, rng.randrange(1 << 40)))
            elif r < 0.85:
                ops.append(("d", c, 0))
            else:
                ops.append(("w", c, rng.randrange(1 << 40)))
        print("B " + ";".join(f"{k} {c} {t}" for k, c, t in ops), flush=True)
        await asyncio.gather(*(run_op(node, cs, *op) for op in ops))
        if rng.random() < 0.2:
            await node.flush()
            print(f"F {b}", flush=True)
        b += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
