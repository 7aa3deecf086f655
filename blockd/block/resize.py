"""``block_resize`` (QEMU's qmp_block_resize and bdrv_co_truncate), and
``change-backing-file`` (qmp_change_backing_file): the two commands that change one image
in place without a job.

A resize takes the RESIZE permission through a user of its own (so a parent that does not
share resizing refuses it with QEMU's permission text), quiesces the node and everything
above it, and lets the driver grow or shrink the image; dirty bitmaps follow the new length.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from blockd.block.chain import chain_contains
from blockd.block.node import BlockNode, BlockUser
from blockd.block.perm import Perm
from blockd.block.snapshot import reopen_read_only
from blockd.errors import QmpError, strerror

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph

#: QEMU's BDRV_MAX_LENGTH: the largest image size its request checks accept.
MAX_LENGTH = (2**63 - 1) // 2**30 * 2**30


def _in_use(node: BlockNode) -> bool:
    """QEMU's op blockers: a job's, or the one a backing link puts on its backing node."""
    if node.blockers:
        return True
    return any(e.name == "backing" and isinstance(e.parent, BlockNode) for e in node.parents)


async def block_resize(
    graph: BlockGraph, device: str | None, node_name: str | None, size: int
) -> None:
    """**Raises** QmpError with QEMU's texts; on error the image is unchanged."""
    # QSD has no BlockBackend names, so a node is only ever found by node-name.
    node = graph.find(node_name) if node_name is not None else None
    if node is None:
        raise QmpError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")
    if size < 0:
        raise QmpError("Parameter 'size' expects a >0 size")
    if _in_use(node):
        raise QmpError(f"Device '{device if device is not None else '(null)'}' is in use")
    user = BlockUser("an unnamed block device")
    user.attach(node, Perm.RESIZE, Perm.all())
    try:
        if size > MAX_LENGTH:
            raise QmpError(f"offset({size}) exceeds maximum({MAX_LENGTH})")
        if node.read_only:
            raise QmpError("Image is read-only")
        async with graph.drained(node):
            try:
                await node.truncate(size)
            except OSError as exc:
                err = strerror(exc.errno or errno.EIO)
                raise QmpError(f"Could not resize file: {err}") from None
    finally:
        await user.detach_all()


async def change_backing_file(
    graph: BlockGraph, device: str, image_node_name: str, backing_file: str
) -> None:
    """Write *backing_file* into the header of *image_node_name*, a node of *device*'s
    chain, without touching the graph (QEMU records the image's own format as the backing
    format here). A read-only image is reopened read-write for the write and back after."""
    root = graph.lookup(device, device)
    if any(not (isinstance(e.parent, BlockUser) and e.backend) for e in root.parents):
        raise QmpError("Need a root block node")
    image = graph.lookup(image_node_name)
    if image.cow_backing() is None:
        raise QmpError("not allowing backing file change on an image without a backing file")
    root.check_not_busy()
    if not chain_contains(root, image):
        raise QmpError(f"'{device}' and image file are not in the same chain")
    was_ro = image.read_only
    if was_ro:
        await reopen_read_only(image, False)
    try:
        async with graph.drained(image):
            await image.driver.change_backing_file(backing_file, image.drv)
    except OSError as exc:
        err = strerror(exc.errno or errno.EIO)
        raise QmpError(f"Could not change backing file to '{backing_file}': {err}") from None
    finally:
        if was_ro:
            await reopen_read_only(image, True)
