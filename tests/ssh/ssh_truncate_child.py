"""Child process of the truncate test: opens an ssh node through blockd's graph (run with the
lab's wrapped passwd entry, so it sees the lab's keys and never the real ~/.ssh) and resizes it
the ways qcow2 and ``block_resize`` do. Prints one JSON line: what each step answered and how
long the remote file was after it.

Usage: ssh_truncate_child.py PORT PATH
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from blockd.block.graph import BlockGraph
from blockd.errors import QmpError
from blockd.qapi.base import ArgsValidator
from blockd.qapi.block import BlockdevOptions

MiB = 1024 * 1024


def remote_size(path: str) -> int:
    return os.path.getsize(path)  # the lab's server is this machine


async def main(port: str, path: str) -> None:
    graph = BlockGraph()
    opts = {"driver": "ssh", "node-name": "t", "server": {"host": "127.0.0.1", "port": port}}
    node = await graph.add(ArgsValidator(BlockdevOptions).validate({**opts, "path": path}))
    out: list[Any] = []

    async def step(name: str, size: int, prealloc: str = "off") -> None:
        try:
            await node.truncate(size, prealloc=prealloc)
            res = "ok"
        except QmpError as exc:
            res = exc.desc
        out.append([name, res, node.length, remote_size(path)])

    await step("grow", 3 * MiB)
    await step("give back what it grew", 2 * MiB)
    await node.write(2 * MiB - 4096, b"\x01" * 4096)
    await step("shrink below written data", MiB)
    await step("falloc", 4 * MiB, "falloc")
    await step("grow again", 5 * MiB)
    await step("shrink to the written end", 2 * MiB)
    await node.close()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
