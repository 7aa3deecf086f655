"""The graph foundation under load, in-process: drained sections, all-or-nothing replace,
frozen links. Real drivers (null-co with latency, file, qcow2), no mocks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from support import qemu_img

from blockd.block.graph import BlockGraph
from blockd.block.node import BlockNode, BlockUser
from blockd.block.perm import Perm
from blockd.errors import QmpError
from blockd.qapi.base import ArgsValidator
from blockd.qapi.block import BlockdevOptions

_V = ArgsValidator(BlockdevOptions)


async def _add(graph: BlockGraph, opts: dict[str, Any]) -> BlockNode:
    return await graph.add(_V.validate(opts))


async def test_drained_returns_under_steady_writes() -> None:
    """Eight writers keep a node busy; a drained section still begins (in-flight requests
    only are waited for) and no external write reaches the node inside it."""
    graph = BlockGraph()
    node = await _add(
        graph, {"driver": "null-co", "node-name": "n", "size": 1 << 20, "latency-ns": 2_000_000}
    )
    writes_inside = 0
    inside = False
    stop = False

    async def writer(i: int) -> None:
        nonlocal writes_inside
        while not stop:
            await node.write((i * 4096) % (1 << 20), b"x" * 4096)
            if inside:
                writes_inside += 1

    tasks = [asyncio.create_task(writer(i)) for i in range(8)]
    await asyncio.sleep(0.05)

    async def sections() -> None:
        nonlocal inside
        for _ in range(5):
            async with graph.drained(node):
                inside = True
                await asyncio.sleep(0.02)  # requests pile up at the gate meanwhile
                assert node.in_flight == 0
                inside = False

    # A drain that waited for new requests too would never begin: the bound catches that
    # hang, it does not measure speed.
    await asyncio.wait_for(sections(), 60)
    stop = True
    await asyncio.gather(*tasks)
    assert writes_inside == 0
    await graph.close_all()


async def test_drained_section_may_do_its_own_io(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    graph = BlockGraph()
    node = await _add(
        graph,
        {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(img)}},
    )
    async with graph.drained(node):
        await asyncio.wait_for(node.write(0, b"y" * 65536), 5)
        assert bytes(await node.read(0, 4)) == b"yyyy"
    await graph.close_all()


async def test_failed_replace_leaves_every_edge_as_it_was(tmp_path: Path) -> None:
    """A replace that would let a reader's node become a writer's target fails on
    permissions; the parents, their order and every edge's permissions are unchanged."""
    a, b = tmp_path / "a.raw", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "raw", a, "4M")
    qemu_img("create", "-q", "-f", "qcow2", b, "4M")
    graph = BlockGraph()
    old = await _add(
        graph, {"driver": "raw", "node-name": "old", "file": {"driver": "file", "filename": str(a)}}
    )
    await _add(graph, {"driver": "file", "node-name": "bf", "filename": str(b)})
    new = await _add(graph, {"driver": "raw", "node-name": "new", "file": "bf"})
    # A qcow2 node on bf unshares write: moving a writer onto new must fail below it.
    await _add(graph, {"driver": "qcow2", "node-name": "q", "file": "bf", "read-only": True})
    writer = BlockUser("an unnamed block device")
    writer.attach(old, Perm.CONSISTENT_READ | Perm.WRITE, Perm.all())
    reader = BlockUser("an unnamed block device")
    reader.attach(old, Perm.CONSISTENT_READ, Perm.all())

    def snapshot() -> list[Any]:
        return [
            (n.node_name, [(e.parent.parent_desc(), e.name, e.perm, e.shared) for e in n.parents])
            for n in graph.nodes.values()
        ]

    before = snapshot()
    with pytest.raises(QmpError, match="Permission conflict on node 'bf'"):
        graph.replace(old, new)
    assert snapshot() == before
    assert all(e.node is old for e in writer.edges + reader.edges)
    # The locks are as before too: the image is still writable through old.
    await old.write(0, b"z" * 512)
    writer.detach_sync(writer.edges[0])
    reader.detach_sync(reader.edges[0])
    await graph.close_all()


async def test_frozen_link_refuses_replace_and_detach(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    graph = BlockGraph()
    t = await _add(
        graph,
        {"driver": "qcow2", "node-name": "t", "file": {"driver": "file", "filename": str(top)}},
    )
    b = t.backing
    assert b is not None
    graph.freeze_chain(t, None, True)
    with pytest.raises(QmpError) as exc:
        graph.check_chain_not_frozen(t, None)
    assert exc.value.desc == f"Cannot change 'backing' link from 't' to '{b.node_name}'"
    other = await _add(graph, {"driver": "null-co", "node-name": "o", "size": 4 << 20})
    with pytest.raises(QmpError, match=f"Cannot change 'backing' link to '{b.node_name}'"):
        graph.replace(b, other)
    with pytest.raises(QmpError, match="Cannot change frozen 'backing' link"):
        await graph.detach(t.children["backing"])
    graph.freeze_chain(t, None, False)
    await graph.close_all()
