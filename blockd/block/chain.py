"""Walking and changing backing chains (QEMU's bdrv_find_overlay, bdrv_chain_contains,
bdrv_find_backing_image and bdrv_set_backing_hd).

A chain walk follows each node's filtered child (filters) or its backing (formats), as QEMU's
bdrv_filter_or_cow_bs does; "the overlay of X" skips filters on both sides.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from blockd.block.perm import ChildRole, PermUpdate, perm_update, refresh
from blockd.errors import QmpError
from blockd.io.pool import run_blocking

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph
    from blockd.block.node import BdrvChild, BlockNode


def filter_or_cow(node: BlockNode) -> BlockNode | None:
    """The next node of a chain walk: a filter's child, else the backing node."""
    return node.filtered_child() if node.driver.is_filter else node.backing


def chain_nodes(top: BlockNode, stop: BlockNode | None = None) -> list[BlockNode]:
    """*top* and the nodes below it, down to (not including) *stop*."""
    out: list[BlockNode] = []
    cur: BlockNode | None = top
    while cur is not None and cur is not stop and cur not in out:
        out.append(cur)
        cur = filter_or_cow(cur)
    return out


def chain_contains(top: BlockNode, node: BlockNode) -> bool:
    return node in chain_nodes(top)


def find_overlay(active: BlockNode, base: BlockNode | None) -> BlockNode | None:
    """The image directly above *base* in *active*'s chain, filters skipped; with no base,
    the last image of the chain (QEMU's bdrv_find_overlay)."""
    if base is not None:
        base = base.skip_filters()
    cur: BlockNode | None = active.skip_filters()
    seen: list[BlockNode] = []
    while cur is not None and cur not in seen:
        seen.append(cur)
        below = cur.cow_backing()
        if below is base:
            return cur
        cur = below
    return None


async def find_backing_image(active: BlockNode, name: str) -> BlockNode | None:
    """The backing node whose image header *name* refers to, compared as canonical paths
    relative to each image's directory (QEMU's bdrv_find_backing_image)."""
    cur: BlockNode | None = active.skip_filters()
    seen: list[BlockNode] = []
    while cur is not None and cur not in seen:
        seen.append(cur)
        below = cur.cow_backing()
        header = cur.driver.backing_file_name
        if below is not None and header and cur.file is not None:
            try:
                want, have = _full_name(cur.file, name), _full_name(cur.file, header)
            except QmpError:
                want = have = ""
            if "://" in want or "://" in have:
                if want == have or name == header:
                    return below
            elif want:
                same: bool = await run_blocking(_same_path, want, have)
                if same:
                    return below
        cur = below
    return None


def _full_name(file_node: BlockNode, name: str) -> str:
    from blockd.block.probe import sibling

    return sibling(file_node, name)[0]


def _same_path(a: str, b: str) -> bool:
    """realpath() of both, as QEMU compares them; a name that does not resolve matches
    nothing."""
    if not (os.path.exists(a) and os.path.exists(b)):
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def swap_backing(
    graph: BlockGraph, node: BlockNode, new: BlockNode | None, upd: PermUpdate | None = None
) -> BdrvChild | None:
    """Make *new* (or nothing) the backing of *node*, all or nothing inside *upd* (QEMU's
    bdrv_set_backing_hd): a frozen backing link, a cycle or a permission conflict leaves
    the graph as it was. Returns the old edge, whose node the caller frees once the update
    is committed (:func:`release_backing`).

    **Concurrency:** the caller quiesces *node* (``graph.drained``) around the change.
    """
    old = node.children.get("backing")
    if old is not None and old.node is new:
        return None
    if old is not None and old.frozen:
        raise QmpError(
            f"Cannot change frozen '{old.name}' link from '{node.node_name}' to "
            f"'{old.node.node_name}'"
        )
    if new is not None and not node.driver.supports_backing:
        raise QmpError(
            f"Driver '{node.drv}' of node '{node.node_name}' does not support backing files"
        )
    with perm_update(upd) as u:
        if old is not None:
            del node.children["backing"]
            old.node.parents.remove(old)

            def undo() -> None:
                node.children["backing"] = old
                old.node.parents.append(old)

            u.undo.append(undo)
        if new is not None:
            graph.attach(node, new, "backing", ChildRole.backing(), update=u)
        if old is not None:
            refresh([old.node], u)
        node.driver.on_backing_attached(new)
        prev = old.node if old is not None else None
        u.undo.append(lambda: node.driver.on_backing_attached(prev))
    return old


async def release_backing(graph: BlockGraph, edge: BdrvChild | None) -> None:
    """Free the node of a detached backing edge if the edge owned it and nothing else
    refers to it (an image opened from a header); monitor-owned nodes stay."""
    if edge is not None and edge.owned:
        await graph.maybe_free(edge.node)
