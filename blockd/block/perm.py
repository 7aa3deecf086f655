"""Permissions on child edges and the roles children play (QEMU's BLK_PERM_*, BdrvChildRole
and the permission update of block.c).

A parent asks for *perm* on a child and tells which permissions it lets others have
(*shared*). Two users of one node conflict when one wants what the other does not share.

Every graph change (attach, detach, replace, reopen, a filter going in or out) ends in one
:func:`refresh`: the permissions of every node below the changed ones are recomputed in
topological order, checked (parent conflicts, read-only nodes, host locks of other processes),
and either applied together or, when any check fails, rolled back together so the graph is
exactly as it was. The conflict texts are QEMU's, and so is the order in which parents are
compared (newest first), so the same mistake gets the same message as in qemu-storage-daemon.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blockd.errors import QmpError

if TYPE_CHECKING:
    from blockd.block.node import BdrvChild, BlockNode


class Perm(enum.IntFlag):
    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08

    @classmethod
    def all(cls) -> Perm:
        return cls.CONSISTENT_READ | cls.WRITE | cls.WRITE_UNCHANGED | cls.RESIZE


PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}

#: What a filter passes through from its parents to its child (DEFAULT_PERM_PASSTHROUGH).
PASSTHROUGH = Perm.all()


def perm_names(perm: Perm) -> str:
    return ", ".join(name for bit, name in PERM_NAMES.items() if perm & bit)


class ChildRole(enum.Flag):
    DATA = enum.auto()
    METADATA = enum.auto()
    FILTERED = enum.auto()
    COW = enum.auto()  # backing
    PRIMARY = enum.auto()

    @classmethod
    def image(cls) -> ChildRole:
        """The ``file`` child of a format driver."""
        return cls.DATA | cls.METADATA | cls.PRIMARY

    @classmethod
    def backing(cls) -> ChildRole:
        return cls.COW

    @classmethod
    def filtered(cls) -> ChildRole:
        """The child of a filter (raw without window, blkdebug, the job filters)."""
        return cls.FILTERED | cls.PRIMARY


def default_child_perm(
    writable: bool, role: ChildRole, perm: Perm, shared: Perm
) -> tuple[Perm, Perm]:
    """What a node needs on a child in *role*, given its parents' cumulative *perm* and
    *shared* (QEMU's bdrv_default_perms). *writable*: the node is opened read-write."""
    if role & ChildRole.FILTERED:
        return perm & PASSTHROUGH, shared & PASSTHROUGH
    if role & ChildRole.COW:
        # A backing file is only read; if the parent copes with changing data, others may
        # write and resize it.
        nshared = Perm.WRITE | Perm.RESIZE if shared & Perm.WRITE else Perm(0)
        return perm & Perm.CONSISTENT_READ, nshared | Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
    nperm, nshared = perm & PASSTHROUGH, shared & PASSTHROUGH
    if role & ChildRole.METADATA:
        # Formats touch metadata even when the guest does not write, and never let anyone
        # else write or resize the file under them.
        if writable:
            nperm |= Perm.WRITE | Perm.RESIZE
        nperm |= Perm.CONSISTENT_READ
        nshared &= ~(Perm.WRITE | Perm.RESIZE)
    if role & ChildRole.DATA:
        nshared &= ~Perm.RESIZE
        if nperm & Perm.WRITE_UNCHANGED:
            nperm |= Perm.WRITE
        if nperm & Perm.WRITE:
            nperm |= Perm.RESIZE
    return nperm, nshared


# -- the update ----------------------------------------------------------------------------------
@dataclass
class PermUpdate:
    """One permission update in progress: what it changed, so that it can be undone.

    Drivers that mirror permissions into host state (the file driver's OFD locks) are told
    in three steps, as in QEMU: ``check_perm`` may take what the new state needs on top of
    the old, then either ``set_perm`` (commit) or ``abort_perm`` (rollback).
    """

    edges: dict[BdrvChild, tuple[Perm, Perm]] = field(default_factory=dict)
    checked: list[BlockNode] = field(default_factory=list)
    undo: list[Callable[[], None]] = field(default_factory=list)

    def set_edge(self, edge: BdrvChild, perm: Perm, shared: Perm) -> None:
        if edge not in self.edges:
            self.edges[edge] = (edge.perm, edge.shared)
        edge.perm, edge.shared = perm, shared

    def commit(self) -> None:
        for node in self.checked:
            node.driver.set_perm()

    def abort(self) -> None:
        for node in reversed(self.checked):
            node.driver.abort_perm()
        for edge, (perm, shared) in self.edges.items():
            edge.perm, edge.shared = perm, shared
        for fn in reversed(self.undo):
            fn()


def topological(roots: Iterable[BlockNode]) -> list[BlockNode]:
    """*roots* and everything below them, every node before its children (QEMU's
    bdrv_topological_dfs, children newest first)."""
    found: set[BlockNode] = set()
    out: list[BlockNode] = []

    def visit(node: BlockNode) -> None:
        if node in found:
            return
        found.add(node)
        for edge in reversed(list(node.children.values())):
            visit(edge.node)
        out.append(node)

    for root in roots:
        visit(root)
    out.reverse()
    return out


def cumulative(node: BlockNode) -> tuple[Perm, Perm]:
    perm = Perm(0)
    shared = Perm.all()
    for edge in node.parents:
        perm |= edge.perm
        shared &= edge.shared
    return perm, shared


def _user_desc(edge: BdrvChild) -> str:
    return edge.parent.parent_desc()


def check_parents(node: BlockNode) -> None:
    """Every pair of parents must tolerate each other (QEMU's bdrv_parent_perms_conflict:
    newest parent first, each pair both ways)."""
    parents = list(reversed(node.parents))
    for a in parents:
        for b in parents:
            if a is b:
                continue
            clash = b.perm & ~a.shared
            if clash:
                name = node.node_name
                raise QmpError(
                    f"Permission conflict on node '{name}': permissions '{perm_names(clash)}' "
                    f"are both required by {_user_desc(b)} (uses node '{name}' as "
                    f"'{b.name}' child) and unshared by {_user_desc(a)} (uses node '{name}' "
                    f"as '{a.name}' child)."
                )


@contextmanager
def perm_update(outer: PermUpdate | None = None) -> Iterator[PermUpdate]:
    """One all-or-nothing graph change: the body changes edges (registering undo steps) and
    calls :func:`refresh`; an exception undoes everything, success applies the host side.
    Inside an *outer* update the outer one decides."""
    if outer is not None:
        yield outer
        return
    upd = PermUpdate()
    try:
        yield upd
    except BaseException:
        upd.abort()
        raise
    upd.commit()


def refresh(roots: Iterable[BlockNode], upd: PermUpdate) -> None:
    """Recompute and check the permissions of *roots* and everything below them.

    **Raises** QmpError with QEMU's text; the caller's :func:`perm_update` then puts the
    graph's permissions and host locks back exactly as they were.
    """
    for node in topological(roots):
        if node.closed:
            continue
        check_parents(node)
        perm, shared = cumulative(node)
        if perm & (Perm.WRITE | Perm.WRITE_UNCHANGED) and not node.writable():
            raise QmpError("Block node is read-only")
        upd.checked.append(node)
        node.driver.check_perm(perm, shared)
        for edge in node.children.values():
            p, s = node.driver.child_perm(edge.role, perm, shared)
            upd.set_edge(edge, p, s)


def release_perms(node: BlockNode) -> None:
    """Recompute below *node* after a parent went away. Giving permissions back cannot
    conflict, so this cannot fail in a way the caller could act on; a failure would be a
    bug, and is raised as one."""
    with perm_update() as upd:
        refresh([node], upd)
