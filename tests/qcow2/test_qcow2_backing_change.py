"""Rewriting the backing file name in a qcow2 header (what stream, commit and
change-backing-file end with), checked with qemu-img."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import check_image, qemu_img

from blockd.block.graph import BlockGraph
from blockd.qapi.base import ArgsValidator
from blockd.qapi.block import BlockdevOptions


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
async def test_change_backing_file_is_what_qemu_img_reads(tmp_path: Path, compat: str) -> None:
    base, other, top = tmp_path / "base.qcow2", tmp_path / "other.qcow2", tmp_path / "top.qcow2"
    for p in (base, other):
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", p, "4M")
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"compat={compat}",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top,
    )
    if compat == "1.1":
        qemu_img("bitmap", "--add", top, "b0")  # the header rewrite keeps the extension
    graph = BlockGraph()
    node = await graph.add(
        ArgsValidator(BlockdevOptions).validate(
            {"driver": "qcow2", "node-name": "t", "file": {"driver": "file", "filename": str(top)}}
        )
    )
    await node.driver.change_backing_file("other.qcow2", "qcow2")
    info = json.loads(qemu_img("info", "-U", "--output=json", top).stdout)
    assert info["backing-filename"] == "other.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    await node.driver.change_backing_file(None, None)
    await graph.close_all()
    info = json.loads(qemu_img("info", "--output=json", top).stdout)
    assert "backing-filename" not in info
    assert check_image(top)["rc"] == 0
    if compat == "1.1":
        assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == ["b0"]
