"""``blockdev-reopen`` (QEMU's qmp_blockdev_reopen and bdrv_reopen_multiple).

Each entry of the list names a node and gives its complete new options: an option left out
goes back to its default. What can change is what QEMU lets change: read-only (the node and
the data children it opened, in both directions), ``auto-read-only``, ``discard``,
``detect-zeroes``, ``cache.no-flush``, the backing child (another node, or none), and the
runtime tuning options of a format. Every other option must keep its value, with QEMU's
"Cannot change the option" and "cannot be reset to its default value" refusals.

The list is one transaction: every entry is checked before anything changes, and if a later
change fails (a permission conflict, a frozen link, a file that cannot be reopened) the ones
already made are undone, so either all entries take effect or none. Every change runs inside
a drained section of the nodes it touches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from blockd.block.chain import release_backing, swap_backing
from blockd.block.node import BdrvChild, BlockNode
from blockd.block.perm import perm_update, refresh
from blockd.block.snapshot import reopen_read_only
from blockd.errors import QmpError

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph

log = logging.getLogger(__name__)

#: Options any node may change on reopen (QEMU handles them generically).
_GENERIC = {"driver", "node-name", "read-only", "auto-read-only", "discard", "detect-zeroes"}
#: Options a driver lets change or reset (QEMU's mutable_opts and reopen_prepare).
_MUTABLE: dict[str, set[str]] = {
    "qcow2": {
        "lazy-refcounts",
        "pass-discard-request",
        "pass-discard-snapshot",
        "pass-discard-other",
        "overlap-check",
        "cache-size",
        "l2-cache-size",
        "l2-cache-entry-size",
        "refcount-cache-size",
        "cache-clean-interval",
    },
    "file": {"drop-cache", "x-check-cache-dropped"},
}
_CHILDREN = ("file", "backing", "image", "data-file")


@dataclass(eq=False)
class _Entry:
    """One node's new state, checked and not yet applied."""

    node: BlockNode
    read_only: bool
    auto_read_only: bool
    discard: str
    detect_zeroes: str
    no_flush: bool
    #: The new backing node, when the entry changes it (None: detach).
    backing: BlockNode | None = None
    change_backing: bool = False
    children: list[_Entry] = field(default_factory=list)


async def blockdev_reopen(graph: BlockGraph, options: list[Any]) -> None:
    """Reopen every node of *options* as one transaction. **Raises** QmpError."""
    targets: list[tuple[BlockNode, Any]] = []
    for opts in options:
        name = opts.node_name
        if name is None:
            raise QmpError("node-name not specified")
        node = graph.find(name)
        if node is None:
            raise QmpError(f"Failed to find node with node-name='{name}'")
        targets.append((node, opts))
    entries = [_plan(graph, node, opts.wire(), opts, None) for node, opts in targets]
    if not entries:
        return  # QSD 7.2 aborts on an empty list; there is nothing to do
    await _apply(graph, entries)


# -- checking ------------------------------------------------------------------------------
def _plan(
    graph: BlockGraph, node: BlockNode, new: dict[str, Any], opts: Any, parent_ro: bool | None
) -> _Entry:
    """Check one node's new options against its current ones, in QEMU's order."""
    old = node.options
    fields: set[str] = set(getattr(opts, "model_fields_set", ())) if opts is not None else set()
    ro_given = "read-only" in new
    read_only = bool(new.get("read-only")) if ro_given or parent_ro is None else parent_ro
    dz = str(new.get("detect-zeroes", "off"))
    discard = str(new.get("discard", "ignore"))
    if dz == "unmap" and discard != "unmap":
        raise QmpError(
            "setting detect-zeroes to unmap is not allowed without setting discard "
            "operation to unmap"
        )
    if bool(new.get("force-share", False)) != node.force_share:
        raise QmpError("Cannot change the option 'force-share'")
    mutable = _GENERIC | _MUTABLE.get(node.drv, set()) | {"cache", "force-share", *_CHILDREN}
    for key in old:
        if key not in new and key not in mutable:
            raise QmpError(f"Option '{key}' cannot be reset to its default value")
    cache = new.get("cache") or {}
    if bool(cache.get("direct", False)) != node.cache_direct:
        raise QmpError("Cannot change the option 'cache.direct'")
    entry = _Entry(
        node,
        read_only,
        bool(new.get("auto-read-only", False)),
        discard,
        dz,
        bool(cache.get("no-flush", False)),
    )
    named = node.backing is not None or node.driver.backing_file_name
    if node.driver.supports_backing and "backing" not in fields | new.keys() and named:
        raise QmpError(f"backing is missing for '{node.node_name}'")
    if "backing" in fields | new.keys():
        ref = new.get("backing")
        if isinstance(ref, dict):
            raise QmpError("Cannot change the option 'backing.driver'")
        target = None if ref is None else graph.lookup(ref)
        if target is not node.backing:
            entry.backing, entry.change_backing = target, True
    for key, value in new.items():
        if key in _GENERIC or key in _MUTABLE.get(node.drv, set()) or key == "cache":
            if key in ("driver", "node-name") and value != old.get(key, value):
                raise QmpError(f"Cannot change the option '{key}'")
            continue
        if key == "backing":
            continue
        if key in _CHILDREN:
            entry.children.append(_plan_child(graph, node, key, value, read_only))
            continue
        if value != old.get(key):
            raise QmpError(f"Cannot change the option '{key}'")
    return entry


def _plan_child(
    graph: BlockGraph, parent: BlockNode, name: str, value: Any, parent_ro: bool
) -> _Entry:
    edge: BdrvChild | None = parent.children.get(name)
    if edge is None:
        raise QmpError(f"Cannot change the option '{name}'")
    if isinstance(value, str):
        target = graph.lookup(value)
        if target is not edge.node:
            raise QmpError(f"blockd cannot replace the '{name}' child of '{parent.node_name}'")
        # A reference to the current child: reopened with its own options.
        return _plan(graph, target, dict(target.options), None, parent_ro)
    child = edge.node
    given = value.get("node-name")
    if given is not None and given != child.node_name:
        raise QmpError("Cannot change the option 'node-name'")
    if value.get("driver") != child.drv:
        raise QmpError("Cannot change the option 'driver'")
    entry = _plan(graph, child, {**value, "node-name": child.node_name}, None, parent_ro)
    if entry.read_only and not parent_ro:
        raise QmpError(f"Read-only block node '{child.node_name}' cannot support read-write users")
    return entry


# -- applying ------------------------------------------------------------------------------
def _walk(entries: list[_Entry]) -> list[_Entry]:
    out: list[_Entry] = []
    for e in entries:
        out.append(e)
        out.extend(_walk(e.children))
    return out


async def _apply(graph: BlockGraph, entries: list[_Entry]) -> None:
    """The read-only switches first (each all or nothing itself), then every backing link
    in one permission update, then the flags; a failure undoes what was done before it.
    Switches come first because only they cannot be undone by a permission update's own
    rollback, which restores the very edges (and whether they own their nodes)."""
    every = _walk(entries)
    nodes = list(dict.fromkeys(e.node for e in every))
    old_edges: list[BdrvChild] = []
    async with graph.drained(*nodes):
        flipped: list[tuple[BlockNode, bool]] = []
        try:
            for e in entries:
                if e.read_only != e.node.read_only:
                    await reopen_read_only(e.node, e.read_only)
                    flipped.append((e.node, not e.read_only))
            with perm_update() as upd:
                for e in every:
                    if e.change_backing:
                        old = swap_backing(graph, e.node, e.backing, upd)
                        if old is not None:
                            old_edges.append(old)
                refresh(nodes, upd)
        except BaseException:
            for node, ro in reversed(flipped):
                await _best_effort(reopen_read_only(node, ro))
            raise
        for e in every:
            e.node.auto_read_only = e.auto_read_only
            e.node.discard_mode = e.discard
            e.node.detect_zeroes = e.detect_zeroes
            e.node.cache_no_flush = e.no_flush
    for edge in old_edges:
        await release_backing(graph, edge)


async def _best_effort(coro: Any) -> None:
    try:
        await coro
    except Exception as exc:  # pragma: no cover - the first error is the one reported
        log.error("undoing a reopen failed: %s", exc)
