"""The ``block-stream`` command model (QEMU's qapi/block-core.json, BlockStream arguments in
7.2's member order)."""

from __future__ import annotations

from blockd.qapi.base import QapiModel
from blockd.qapi.job import BlockdevOnError


class BlockStream(QapiModel):
    job_id: str | None = None
    device: str
    base: str | None = None
    base_node: str | None = None
    backing_file: str | None = None
    bottom: str | None = None
    speed: int | None = None
    on_error: BlockdevOnError | None = None
    filter_node_name: str | None = None
    auto_finalize: bool | None = None
    auto_dismiss: bool | None = None
