"""What ``query-named-block-nodes`` reports for a node (QEMU's block/qapi.c)."""

from __future__ import annotations

from typing import Any

from blockd.block.chain import chain_nodes, filter_or_cow
from blockd.block.node import BlockNode


def image_info(node: BlockNode, flat: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "filename": node.filename,
        "format": node.drv,
        "virtual-size": node.length,
    }
    actual = node.driver.actual_size()
    if actual is not None:
        info["actual-size"] = actual
    info.update(node.driver.image_info())
    # QEMU follows a filter's child here as it follows a backing link (the job filters show
    # the image below them as their backing image).
    back = filter_or_cow(node)
    if back is not None and not flat:
        info["backing-image"] = image_info(back, flat)
    return info


def bitmap_infos(node: BlockNode) -> list[dict[str, Any]]:
    out = node.driver.internal_bitmap_infos()
    for bm in reversed(node.dirty_bitmaps):
        info = getattr(bm, "info", None)
        if info is not None:
            out.append(info())
    return out


def block_device_info(node: BlockNode, flat: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "file": node.filename,
        "node-name": node.node_name,
        "ro": node.read_only,
        "drv": node.drv,
    }
    # QEMU replaces the header's name by the backing node's filename once one is attached.
    backing = node.backing
    # A job filter's child is its backing, but it has no header naming one.
    backing_name = backing.filename if backing is not None and not node.driver.is_filter else None
    backing_name = backing_name or node.driver.header_backing_name()
    if backing_name:
        out["backing_file"] = backing_name
    out.update(
        {
            "backing_file_depth": 0 if flat else len(chain_nodes(node)) - 1,
            "encrypted": False,
            "detect_zeroes": node.detect_zeroes,
            "bps": 0,
            "bps_rd": 0,
            "bps_wr": 0,
            "iops": 0,
            "iops_rd": 0,
            "iops_wr": 0,
            "image": image_info(node, flat),
            "cache": {
                "writeback": True,
                "direct": node.cache_direct,
                "no-flush": node.cache_no_flush,
            },
            "write_threshold": node.write_threshold,
        }
    )
    bitmaps = bitmap_infos(node)
    if bitmaps:
        out["dirty-bitmaps"] = bitmaps
    return out
