"""What a running stream holds, in-process: the links from its filter down to the last image it
copies from are frozen, so the first step of a commit over the same chain (freezing it),
a backing change, a replace and a detach are all refused with QEMU's texts while the job runs,
and allowed again once it is gone. Real qcow2 images, a real job, no mocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from chainsupport import build_chain

from blockd.block.chain import swap_backing
from blockd.block.graph import BlockGraph
from blockd.errors import QmpError
from blockd.job.manager import JobManager
from blockd.job.stream import start_stream
from blockd.qapi.base import ArgsValidator
from blockd.qapi.block import BlockdevOptions
from blockd.qapi.stream import BlockStream

_OPTS = ArgsValidator(BlockdevOptions)
_STREAM = ArgsValidator(BlockStream)


async def test_a_stream_freezes_its_chain(tmp_path: Path) -> None:
    build_chain(tmp_path)
    graph = BlockGraph()
    events: list[tuple[str, dict[str, Any]]] = []
    jobs = JobManager(lambda name, data: events.append((name, data)))
    nodes = {}
    for name, below in (("base", None), ("mid", "base"), ("top", "mid")):
        opts: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": name,
            "file": {"driver": "file", "filename": str(tmp_path / f"{name}.qcow2")},
        }
        if below:
            opts["backing"] = below
        nodes[name] = await graph.add(_OPTS.validate(opts))
    top, mid, base = nodes["top"], nodes["mid"], nodes["base"]
    args = {"job-id": "s", "device": "top", "base-node": "base", "speed": 1}
    job = await start_stream(jobs, graph, _STREAM.validate(args))
    cor = top.parents[0].parent
    try:
        with pytest.raises(QmpError, match=r"^Cannot change 'backing' link from 'top' to 'mid'$"):
            graph.freeze_chain(top, base, True)  # what a commit of top into base does first
        assert not base.parents[0].frozen  # the refused freeze left nothing behind
        with pytest.raises(QmpError, match=r"^Cannot change frozen 'backing' link from 'top'"):
            swap_backing(graph, top, base)
        with pytest.raises(QmpError, match=r"^Cannot change 'backing' link to 'mid'$"):
            graph.replace(mid, base)
        with pytest.raises(QmpError, match=r"^Cannot change frozen 'file' link from"):
            await graph.detach(cor.children["file"])  # type: ignore[union-attr]
        with pytest.raises(QmpError, match=r"^Node 'mid' is busy: block device is in use by"):
            mid.check_not_busy()
        # mid's own backing link is not the job's: QEMU leaves it free, so does blockd.
        graph.freeze_chain(mid, base, True)
        graph.freeze_chain(mid, base, False)
    finally:
        await job.user_cancel(force=True)
        await job.wait()
    assert ("BLOCK_JOB_CANCELLED", job._event_data()) in events
    assert top.parents == [] and top.backing is mid
    graph.freeze_chain(top, base, True)
    graph.freeze_chain(top, base, False)
    await graph.close_all()
