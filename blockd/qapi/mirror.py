"""Mirror and commit command models (QEMU's qapi/block-core.json: DriveMirror,
BlockdevMirror, MirrorCopyMode and block-commit's arguments)."""

from __future__ import annotations

from blockd.qapi.backup import MirrorSyncMode, NewImageMode
from blockd.qapi.base import Int64, QapiEnum, QapiModel, UInt32
from blockd.qapi.job import BlockdevOnError


class MirrorCopyMode(QapiEnum):
    BACKGROUND = "background"
    WRITE_BLOCKING = "write-blocking"


class DriveMirror(QapiModel):
    job_id: str | None = None
    device: str
    target: str
    format: str | None = None
    node_name: str | None = None
    replaces: str | None = None
    sync: MirrorSyncMode
    mode: NewImageMode | None = None
    speed: Int64 | None = None
    granularity: UInt32 | None = None
    buf_size: Int64 | None = None
    on_source_error: BlockdevOnError | None = None
    on_target_error: BlockdevOnError | None = None
    unmap: bool | None = None
    copy_mode: MirrorCopyMode | None = None
    auto_finalize: bool | None = None
    auto_dismiss: bool | None = None


class BlockdevMirror(QapiModel):
    job_id: str | None = None
    device: str
    target: str
    replaces: str | None = None
    sync: MirrorSyncMode
    speed: Int64 | None = None
    granularity: UInt32 | None = None
    buf_size: Int64 | None = None
    on_source_error: BlockdevOnError | None = None
    on_target_error: BlockdevOnError | None = None
    filter_node_name: str | None = None
    copy_mode: MirrorCopyMode | None = None
    auto_finalize: bool | None = None
    auto_dismiss: bool | None = None


class BlockCommit(QapiModel):
    job_id: str | None = None
    device: str
    base_node: str | None = None
    base: str | None = None
    top_node: str | None = None
    top: str | None = None
    backing_file: str | None = None
    speed: Int64 | None = None
    on_error: BlockdevOnError | None = None
    filter_node_name: str | None = None
    auto_finalize: bool | None = None
    auto_dismiss: bool | None = None
