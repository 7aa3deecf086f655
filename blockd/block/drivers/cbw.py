"""The copy-before-write filter of a backup job (QEMU's block/copy-before-write.c).

Inserted above the backup's source, it takes over every parent of the source, so every write
meant for the source passes it first; before such a write goes on, the old data of the range
is copied to the target (or the write waits for the background copy already doing it). The
job's copy engine does the copying; this node only calls it, from its before-write hook.

Its permissions are QEMU's, which is what refuses a backup whose target is a parent of its
source, or a new writer attached beside the filter while the backup runs: the filter writes
the target, and does not share writing the source with anyone once it has users.
"""

from __future__ import annotations

from typing import Any

from blockd.block.driver import register_driver
from blockd.block.drivers.filter import FilterDriver
from blockd.block.perm import ChildRole, Perm


@register_driver
class CopyBeforeWriteDriver(FilterDriver):
    format_name = "copy-before-write"

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        #: Reported like QEMU's internal bitmaps (copy bitmap, done bitmap) for
        #: ``query-named-block-nodes``: (granularity, bytes still to copy).
        self.progress: Any = None

    def child_perm(self, role: ChildRole, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        if not role & ChildRole.FILTERED:
            # The target: written by the filter; others may write it too (a guest writing a
            # disk in the target's backing chain), nobody may resize it.
            return Perm.WRITE, Perm.all() & ~Perm.RESIZE
        nperm, nshared = super().child_perm(role, perm, shared)
        if self.node.parents:
            if perm & Perm.WRITE:
                nperm |= Perm.CONSISTENT_READ
            nshared &= ~(Perm.WRITE | Perm.RESIZE)
        return nperm, nshared

    def internal_bitmap_infos(self) -> list[dict[str, Any]]:
        if self.progress is None:
            return []
        granularity, remaining = self.progress()
        base = {"recording": False, "persistent": False, "busy": False}
        return [
            {**base, "granularity": granularity, "count": remaining},
            {**base, "granularity": granularity, "count": 0},
        ]
