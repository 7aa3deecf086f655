"""Dirty-bitmap command models (QEMU's qapi/block-core.json: BlockDirtyBitmap*,
block-dirty-bitmap-* arguments)."""

from __future__ import annotations

from blockd.qapi.base import QapiModel, alternate


class BlockDirtyBitmap(QapiModel):
    """``{node, name}``: arguments of remove/clear/enable/disable, and a merge source."""

    node: str
    name: str


class BlockDirtyBitmapAdd(QapiModel):
    node: str
    name: str
    #: uint32 in QAPI; range is checked by the command so the refusal reads as QEMU's
    #: "Parameter 'granularity' expects uint32_t".
    granularity: int | None = None
    persistent: bool | None = None
    disabled: bool | None = None


BlockDirtyBitmapOrStr = alternate(
    "BlockDirtyBitmapOrStr", {"string": str, "object": BlockDirtyBitmap}
)


class BlockDirtyBitmapMerge(QapiModel):
    node: str
    target: str
    bitmaps: list[BlockDirtyBitmapOrStr]  # type: ignore[valid-type]
