"""Child process of the crash test: opens a qcow2 image through blockd's graph and runs a
seeded random workload until it is killed with SIGKILL.

Protocol on stdout, one line each, flushed at once so the parent sees every line written
before the kill:

* ``READY`` once the image is open;
* ``B <op>;<op>;…`` before a batch of ops is issued (see qcow2_helpers.Op.line);
* ``F <n>`` after a flush that completed when batches 0..n had completed: those are durable.

Usage: qcow2_crash_child.py IMAGE SEED
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # support

from qcow2_helpers import MiB, apply_op, batches, open_qcow2, pattern, random_ops

from blockd.block.graph import BlockGraph


async def main(path: str, seed: int) -> None:
    rng = random.Random(seed)
    pat = pattern(seed)
    graph = BlockGraph()
    node = await open_qcow2(graph, path)
    size = node.length
    print("READY", flush=True)
    n = 0
    while True:
        ops = random_ops(rng, size, 50, max_len=MiB)
        for batch in batches(ops, rng):
            print("B " + ";".join(op.line() for op in batch), flush=True)
            await asyncio.gather(*(apply_op(node, op, pat) for op in batch))
            if rng.random() < 0.15:
                await node.flush()
                print(f"F {n}", flush=True)
            n += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
