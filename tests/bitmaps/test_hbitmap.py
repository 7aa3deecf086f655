"""HBitmap against a naive model (a Python set of granule indexes), and the successor
protocol of DirtyBitmap, in process."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from blockd.bitmap.dirty import DirtyBitmap, create_bitmap, find_bitmap
from blockd.bitmap.hbitmap import HBitmap

GRAN = 4096
SIZE = 64 * GRAN + 100  # a partial last granule

ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "reset"]),
        st.integers(0, SIZE + GRAN),
        st.integers(0, 20 * GRAN),
    ),
    max_size=30,
)


def _model_apply(model: set[int], op: str, off: int, n: int) -> None:
    if n <= 0 or off >= SIZE:
        return
    end = min(off + n, SIZE)
    granules = set(range(off // GRAN, (end - 1) // GRAN + 1))
    if op == "set":
        model |= granules
    else:
        model -= granules


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(0, SIZE))
def test_hbitmap_matches_model(seq: list[tuple[str, int, int]], probe: int) -> None:
    hb = HBitmap(SIZE, GRAN)
    model: set[int] = set()
    for op, off, n in seq:
        getattr(hb, op)(off, n)
        _model_apply(model, op, off, n)
    assert hb.count() == len(model) * GRAN
    dirty = [i for i in range(probe // GRAN, 65) if i in model]
    want = max(dirty[0] * GRAN, probe) if dirty else -1
    assert hb.next_dirty(probe) == (want if probe < SIZE else -1)
    areas = list(hb.dirty_areas())
    covered = {(o + k) // GRAN for o, n in areas for k in range(0, n, GRAN)}
    assert covered == model
    # merge into a coarser bitmap rounds outwards
    coarse = HBitmap(SIZE, GRAN * 4)
    coarse.merge(hb)
    assert {i // 4 for i in model} == {
        o // (GRAN * 4) for o, _ in coarse.dirty_areas() for o in range(o, o + _, GRAN * 4)
    }


class _FakeNode:
    """Just what DirtyBitmap needs of a node."""

    node_name = "n"
    length = 1 << 20

    def __init__(self) -> None:
        self.dirty_bitmaps: list[Any] = []
        self.driver = object()

    def write(self, off: int, n: int) -> None:  # the request path's _mark_dirty
        for bm in self.dirty_bitmaps:
            if bm.is_recording():
                bm.set_range(off, n)


def test_successor_reclaim_keeps_everything() -> None:
    node: Any = _FakeNode()
    bm = create_bitmap(node, "b", 65536)
    node.write(0, 65536)
    succ = bm.create_successor()
    assert bm.busy and not bm.is_recording() and bm.recording
    node.write(65536 * 3, 10)
    assert bm.count == 65536 and succ.count == 65536
    bm.reclaim()
    assert node.dirty_bitmaps == [bm] and bm.count == 2 * 65536 and not bm.busy
    assert bm.is_recording()


def test_successor_abdicate_keeps_new_writes_only_and_moves_to_newest() -> None:
    node: Any = _FakeNode()
    bm = create_bitmap(node, "b", 65536)
    other = create_bitmap(node, "o", 65536, disabled=True)
    node.write(0, 65536)
    bm.create_successor()
    node.write(65536 * 5, 1)
    new = bm.abdicate()
    assert isinstance(new, DirtyBitmap) and new.name == "b" and find_bitmap(node, "b") is new
    assert new.count == 65536 and not new.busy
    assert node.dirty_bitmaps == [other, new]
