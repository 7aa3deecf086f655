"""Named dirty bitmaps owned by a node (QEMU's block/dirty-bitmap.c).

A :class:`DirtyBitmap` hangs off ``BlockNode.dirty_bitmaps`` (oldest first; queries list
them newest first). The generic write path of :class:`blockd.block.node.BlockNode` sets bits in
every bitmap whose :meth:`DirtyBitmap.is_recording` is true, so no writer can bypass tracking.

**Successor protocol** (what backup's ``bitmap-mode`` rests on):

* :meth:`DirtyBitmap.create_successor` freezes the bitmap (busy, not recording) and adds an
  anonymous child that records the writes made from now on;
* :meth:`DirtyBitmap.abdicate` (job succeeded, or ``always``): the child takes the name and the
  place of the parent, whose bits are dropped;
* :meth:`DirtyBitmap.reclaim` (job failed or ``never``): the child's bits are merged back into
  the parent, so nothing that was ever dirty is lost.

**Persistence interface** for format drivers (qcow2) — all optional driver methods:

* ``can_store_new_dirty_bitmap(name: str, granularity: int) -> None`` — raise
  :class:`~blockd.errors.QmpError` with the reason when a ``persistent`` bitmap cannot be
  stored; without this method blockd answers ``Can't store persistent bitmaps to <node>:
  Operation not supported`` as QEMU does for drivers without support.
* ``remove_persistent_dirty_bitmap(name: str) -> Awaitable[None]`` — called by
  ``block-dirty-bitmap-remove`` for a persistent bitmap, before it is released.
* Loading at open: the driver calls :func:`load_bitmap` with each bitmap's bits.
* Storing: the driver's ``close()`` (and inactivation) writes every bitmap of
  ``node.dirty_bitmaps`` that is a :class:`DirtyBitmap` with ``persistent`` set and
  ``skip_store`` clear, using ``bm.name``, ``bm.granularity``, ``bm.disabled`` (QEMU's ``auto``
  flag is ``not disabled``) and the bits themselves (``bm.hb.bits``, a frozen bitmap's
  successor merged in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from blockd.bitmap.hbitmap import HBitmap, is_power_of_2
from blockd.errors import QmpError

if TYPE_CHECKING:
    from bitarray import bitarray

    from blockd.block.node import BlockNode

#: Longest bitmap name QEMU accepts (BDRV_BITMAP_MAX_NAME_SIZE).
MAX_NAME = 1023
MIN_GRANULARITY = 512

# bdrv_dirty_bitmap_check flags
BUSY = 1
RO = 2
INCONSISTENT = 4
DEFAULT = BUSY | RO | INCONSISTENT
ALLOW_RO = BUSY | INCONSISTENT


class DirtyBitmap:
    """One dirty bitmap of *node* (named, or anonymous for internal use).

    **Runs in:** the event loop; every method is synchronous, so a bitmap never changes
    between two awaits of a caller that did not change it.
    """

    def __init__(
        self,
        node: BlockNode,
        name: str | None,
        granularity: int,
        *,
        disabled: bool = False,
        persistent: bool = False,
    ) -> None:
        self.node = node
        self.name = name
        self.hb = HBitmap(node.length, granularity)
        # -- user-visible state
        self.disabled = disabled
        self.persistent = persistent
        self.busy = False
        self.inconsistent = False
        self.readonly = False
        #: Don't write it back to the image (being removed inside a transaction).
        self.skip_store = False
        # -- successor protocol: set while frozen by a job
        self.successor: DirtyBitmap | None = None

    def __repr__(self) -> str:
        return f"<DirtyBitmap {self.name!r} on {self.node.node_name} count={self.count}>"

    @property
    def granularity(self) -> int:
        return self.hb.granularity

    # -- DirtyTracker protocol (used by BlockNode's write path) --------------------------
    def is_recording(self) -> bool:
        """Whether writes set bits in *this* bitmap: only enabled ones. A frozen parent is
        disabled; its successor records for it."""
        return not self.disabled

    def set_range(self, offset: int, nbytes: int) -> None:
        self.hb.set(offset, nbytes)

    def resize(self, size: int) -> None:
        """Follow the node's new length; a new tail starts clean."""
        self.hb.truncate(size)

    # -- contents ----------------------------------------------------------------------
    def reset_range(self, offset: int, nbytes: int) -> None:
        self.hb.reset(offset, nbytes)

    def clear(self) -> None:
        self.hb.reset_all()

    @property
    def count(self) -> int:
        return self.hb.count()

    @property
    def recording(self) -> bool:
        """What queries call ``recording``: enabled, or frozen with a recording successor."""
        succ = self.successor
        return not self.disabled or (succ is not None and not succ.disabled)

    def info(self) -> dict[str, Any]:
        """QEMU's BlockDirtyInfo, members in QSD's order."""
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        out.update(
            {
                "recording": self.recording,
                "persistent": self.persistent,
                "busy": self.busy,
                "granularity": self.granularity,
                "count": self.count,
            }
        )
        if self.inconsistent:
            out["inconsistent"] = True
        return out

    def check(self, flags: int) -> None:
        """QEMU's bdrv_dirty_bitmap_check: refuse use of a busy, read-only or inconsistent
        bitmap with the user-facing texts."""
        if flags & BUSY and self.busy:
            raise QmpError(
                f"Bitmap '{self.name}' is currently in use by another operation and cannot be used"
            )
        if flags & RO and self.readonly:
            raise QmpError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if flags & INCONSISTENT and self.inconsistent:
            raise QmpError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    def merge_from(self, src: DirtyBitmap | HBitmap) -> None:
        hb = src.hb if isinstance(src, DirtyBitmap) else src
        if hb.size != self.hb.size:
            raise QmpError("Bitmaps are incompatible and can't be merged")
        self.hb.merge(hb)

    # -- successor protocol ------------------------------------------------------------
    def create_successor(self) -> DirtyBitmap:
        """Freeze this bitmap for a job; new writes go to an anonymous successor that records
        exactly when this bitmap did."""
        if self.busy:
            raise QmpError("Cannot create a successor for a bitmap that is in-use by an operation")
        if self.successor is not None:
            raise QmpError("Cannot create a successor for a bitmap that already has one")
        child = DirtyBitmap(self.node, None, self.granularity, disabled=self.disabled)
        self.node.dirty_bitmaps.append(child)
        self.successor = child
        self.disabled = True
        self.busy = True
        return child

    def abdicate(self) -> DirtyBitmap:
        """The job succeeded: the successor takes the name (and the newest place); the old
        bits are dropped. Returns the bitmap that now carries the name."""
        child = self.successor
        assert child is not None, "abdicate without successor"
        child.name, self.name = self.name, None
        child.persistent = self.persistent
        child.readonly, child.inconsistent = self.readonly, self.inconsistent
        self.successor = None
        self.busy = False
        release(self.node, self)
        return child

    def reclaim(self) -> DirtyBitmap:
        """The job failed (or ``never``): merge the successor back; nothing is lost."""
        child = self.successor
        assert child is not None, "reclaim without successor"
        self.hb.merge(child.hb)
        self.disabled = child.disabled
        self.successor = None
        self.busy = False
        release(self.node, child)
        return self


# -- node-level helpers -----------------------------------------------------------------
def bitmaps_of(node: BlockNode) -> list[DirtyBitmap]:
    return [bm for bm in node.dirty_bitmaps if isinstance(bm, DirtyBitmap)]


def find_bitmap(node: BlockNode, name: str) -> DirtyBitmap | None:
    """The named bitmap of *node* (QEMU's bdrv_find_dirty_bitmap)."""
    for bm in node.dirty_bitmaps:
        if isinstance(bm, DirtyBitmap) and bm.name == name:
            return bm
    return None


def default_granularity(node: BlockNode) -> int:
    """The node's cluster size clamped to [4 KiB, 64 KiB]; 64 KiB when the driver has no
    cluster size (raw, file, null-co: observed on QSD 7.2)."""
    cluster = node.driver.info_cluster_size()
    if cluster is None or cluster <= 0:
        return 65536
    return min(65536, max(4096, cluster))


def check_granularity(granularity: int) -> None:
    if granularity < MIN_GRANULARITY or not is_power_of_2(granularity):
        raise QmpError("Granularity must be power of 2 and at least 512")


def check_can_store(node: BlockNode, name: str, granularity: int) -> None:
    """Refuse ``persistent`` where the driver cannot store bitmaps (see module docstring)."""
    node.driver.can_store_new_dirty_bitmap(name, granularity)


def create_bitmap(
    node: BlockNode,
    name: str,
    granularity: int,
    *,
    disabled: bool = False,
    persistent: bool = False,
) -> DirtyBitmap:
    """Add a new, clean bitmap (QEMU's bdrv_create_dirty_bitmap checks and texts)."""
    if find_bitmap(node, name) is not None:
        raise QmpError(f"Bitmap already exists: {name}")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise QmpError(f"Bitmap name too long: {name}")
    bm = DirtyBitmap(node, name, granularity, disabled=disabled, persistent=persistent)
    node.dirty_bitmaps.append(bm)
    return bm


def load_bitmap(
    node: BlockNode,
    name: str,
    granularity: int,
    bits: bitarray | None,
    *,
    disabled: bool,
    inconsistent: bool = False,
    readonly: bool = False,
) -> DirtyBitmap:
    """For format drivers: register a persistent bitmap found in the image at open, with
    its *bits* (one per granularity of the node's length; None: all clean). An inconsistent
    one never records (QEMU's bdrv_dirty_bitmap_set_inconsistent disables it)."""
    bm = DirtyBitmap(node, name, granularity, disabled=disabled or inconsistent, persistent=True)
    if bits is not None:
        if len(bits) != len(bm.hb.bits):
            raise ValueError(f"bitmap '{name}': {len(bits)} bits, {len(bm.hb.bits)} expected")
        bm.hb.bits = bits
    bm.inconsistent = inconsistent
    bm.readonly = readonly
    node.dirty_bitmaps.append(bm)
    return bm


def release(node: BlockNode, bm: DirtyBitmap) -> None:
    """Drop *bm* from its node (QEMU's bdrv_release_dirty_bitmap)."""
    if bm in node.dirty_bitmaps:
        node.dirty_bitmaps.remove(bm)
