"""Permissions on child edges and the roles children play (QEMU's BLK_PERM_* and BdrvChildRole).

A parent asks for *perm* on a child and tells which permissions it lets others have
(*shared*). Two users conflict when one wants what the other does not share. The file driver
mirrors the combined permissions into OFD byte locks, which is how a qemu-img on the same image
is refused while blockd writes it.
"""

from __future__ import annotations

import enum


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
        """The child of a filter (raw without window, blkdebug)."""
        return cls.FILTERED | cls.PRIMARY
