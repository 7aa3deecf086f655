"""Models of the block-core commands that change one node in place: ``blockdev-reopen``,
``block_resize`` and ``change-backing-file`` (QEMU's qapi/block-core.json)."""

from __future__ import annotations

from blockd.qapi.base import QapiModel
from blockd.qapi.block import BlockdevOptions


class BlockdevReopen(QapiModel):
    options: list[BlockdevOptions]


class BlockResize(QapiModel):
    device: str | None = None
    node_name: str | None = None
    size: int


class ChangeBackingFile(QapiModel):
    device: str
    image_node_name: str
    backing_file: str
