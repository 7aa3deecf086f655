"""The tool's own reading of a layer: each chunk's hash from the file, whatever order the
clusters landed in.

A layer is hashed in runs of clusters contiguous in the file, so a chunk's place in a run is its
place in the file, not on the disk. The disk's last chunk is short when the size is not a
multiple of the cluster size; it must be hashed over the disk's bytes only, also when the
file holds it before other clusters. Expected hashes come from the guest view `qemu-img`
gives of the same layer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import xxhash
from support import run

from blockd.tools.backup.layers import hash_chunks, read_map

CS = 64 * 1024
TAIL = 4608  # the last chunk: 4.5 KiB of disk
SIZE = 3 * CS + TAIL


@pytest.mark.parametrize("last_first", [True, False], ids=["tail-first", "tail-last"])
def test_chunk_hashes_match_the_guest_view(tmp_path: Path, last_first: bool) -> None:
    base = tmp_path / "base.qcow2"
    layer = tmp_path / "layer.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x44 0 {SIZE}", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", layer)
    writes = [f"write -P 0x22 0 {CS}", f"write -P 0x33 {CS} {CS}"]
    tail = f"write -P 0x11 {3 * CS} {TAIL}"
    writes = [tail, *writes] if last_first else [*writes, tail]
    for w in writes:
        run("qemu-io", "-f", "qcow2", "-c", w, layer)

    lm = read_map(layer)
    # with the tail written first, the file holds chunk 3 before chunks 0 and 1
    order = [idx for idx, _host in sorted(lm.normal, key=lambda c: c[1])]
    assert order == ([3, 0, 1] if last_first else [0, 1, 3])

    raw = tmp_path / "guest.raw"
    run("qemu-img", "convert", "-O", "raw", layer, raw)
    guest = raw.read_bytes()
    assert len(guest) == SIZE
    want = {i: xxhash.xxh3_128_digest(guest[i * CS : min((i + 1) * CS, SIZE)]) for i in (0, 1, 3)}
    assert hash_chunks(lm) == want
