"""External snapshot command models (qapi/block-core.json: BlockdevSnapshotSync,
BlockdevSnapshot, NewImageMode)."""

from __future__ import annotations

from blockd.qapi.base import QapiEnum, QapiModel


class NewImageMode(QapiEnum):
    EXISTING = "existing"
    ABSOLUTE_PATHS = "absolute-paths"


class BlockdevSnapshotSync(QapiModel):
    device: str | None = None
    node_name: str | None = None
    snapshot_file: str
    snapshot_node_name: str | None = None
    format: str | None = None
    mode: NewImageMode | None = None


class BlockdevSnapshot(QapiModel):
    node: str
    overlay: str
