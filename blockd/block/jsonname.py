"""QEMU's ``json:{...}`` pseudo filenames (bdrv_refresh_filename): a node whose options
change what its image means (a filter, a format whose backing is not the one its header
names) is named by the options that would reopen it, children inlined."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockd.block.node import BlockNode


def open_options(node: BlockNode) -> dict[str, Any]:
    """The options that reopen *node* as it is (QEMU's full_open_options): a json: name's
    own options, else the driver over its file, down to the protocol's filename."""
    name = node.filename
    if name.startswith("json:"):
        opts: dict[str, Any] = json.loads(name[5:])
        return opts
    below = node.file
    if below is not None and below is not node:
        return {"driver": node.drv, "file": open_options(below)}
    return {"driver": node.drv, "filename": name}


def json_name(opts: dict[str, Any]) -> str:
    """*opts* as QEMU prints a json: filename."""
    return "json:" + json.dumps(opts)
