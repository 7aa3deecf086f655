"""blockdev-create for qcow2: the image must be what ``qemu-img create`` makes with the same
options (``qemu-img check`` clean, same ``qemu-img info``, and in fact the same bytes)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from qcow2_helpers import MiB, check_image, open_qcow2, qemu_img, to_raw

from blockd.block.drivers.file import FileDriver
from blockd.block.drivers.qcow2.driver import Qcow2Driver
from blockd.block.graph import BlockGraph
from blockd.errors import QmpError
from blockd.qapi.base import ArgsValidator
from blockd.qapi.block import BlockdevCreateOptions, BlockdevOptions


async def blockdev_create(graph: BlockGraph, path: str, qcow2: dict[str, Any]) -> None:
    """The QMP recipe: create the file, blockdev-add it, create qcow2 on that node."""
    fopts = ArgsValidator(BlockdevCreateOptions).validate(
        {"driver": "file", "filename": path, "size": 0}
    )
    await FileDriver.create(fopts, graph)
    await graph.add(
        ArgsValidator(BlockdevOptions).validate(
            {"driver": "file", "filename": path, "node-name": "proto"}
        )
    )
    qopts = ArgsValidator(BlockdevCreateOptions).validate(
        {"driver": "qcow2", "file": "proto", **qcow2}
    )
    await Qcow2Driver.create(qopts, graph)


def _info(path: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(qemu_img("info", "--output=json", path).stdout)
    for k in ("filename", "actual-size", "full-backing-filename"):
        info.pop(k, None)
    return info


CASES: list[tuple[dict[str, Any], list[str]]] = [
    ({"size": 64 * MiB}, []),
    ({"size": 1 << 30, "version": "v2"}, ["-o", "compat=0.10"]),
    ({"size": 16 * MiB, "cluster-size": 512}, ["-o", "cluster_size=512"]),
    (
        {"size": 100 * MiB, "cluster-size": 2 * MiB, "lazy-refcounts": True},
        ["-o", "cluster_size=2M,lazy_refcounts=on"],
    ),
    (
        {"size": 8 * MiB, "refcount-bits": 1, "cluster-size": 4096},
        ["-o", "refcount_bits=1,cluster_size=4096"],
    ),
    ({"size": 8 * MiB, "refcount-bits": 64}, ["-o", "refcount_bits=64"]),
    (
        {"size": 32 * MiB, "backing-file": "base.qcow2", "backing-fmt": "qcow2"},
        ["-b", "base.qcow2", "-F", "qcow2"],
    ),
    (
        {"size": 32 * MiB, "version": "v2", "backing-file": "base.qcow2", "backing-fmt": "qcow2"},
        ["-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2"],
    ),
    (
        {"size": 8 * MiB, "preallocation": "metadata", "cluster-size": 4096},
        ["-o", "preallocation=metadata,cluster_size=4096"],
    ),
    (
        {"size": 3 * MiB, "preallocation": "metadata", "version": "v2"},
        ["-o", "preallocation=metadata,compat=0.10"],
    ),
    # Needs the refcount table to grow: QEMU and blockd place the new table differently
    # (both valid), so only this case is not byte-identical.
    (
        {"size": 40 * MiB, "preallocation": "metadata", "cluster-size": 512},
        ["-o", "preallocation=metadata,cluster_size=512"],
    ),
    ({"size": 0}, []),
]


@pytest.mark.parametrize(("opts", "qemu_args"), CASES)
async def test_create_matches_qemu_img(tmp_path, opts, qemu_args):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "32M")
    mine = str(tmp_path / "mine.qcow2")
    ref = str(tmp_path / "ref.qcow2")
    graph = BlockGraph()
    await blockdev_create(graph, mine, opts)
    await graph.close_all()
    qemu_img("create", "-f", "qcow2", *qemu_args, ref, str(opts["size"]))
    res = check_image(mine)
    assert res["rc"] == 0, res
    assert _info(mine) == _info(ref)
    grows_reftable = opts.get("cluster-size") == 512 and opts.get("preallocation")
    if not grows_reftable:
        with open(mine, "rb") as a, open(ref, "rb") as b:
            assert a.read() == b.read(), "image bytes differ from qemu-img create's"
    # And blockd can use what it made.
    graph = BlockGraph()
    node = await open_qcow2(graph, mine)
    if node.length:
        await node.write(node.length // 2 + 3, b"blockd")
    await graph.close_all()
    assert check_image(mine)["rc"] == 0
    if opts["size"]:
        raw = to_raw(mine, str(tmp_path / "o.raw"))
        assert raw[opts["size"] // 2 + 3 :][:6] == b"blockd"


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
        (
            {"size": MiB, "cluster-size": 1000},
            "Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            {"size": MiB, "cluster-size": 4 * MiB},
            "Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            {"size": MiB, "version": "v2", "lazy-refcounts": True},
            "Lazy refcounts only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)",
        ),
        (
            {"size": MiB, "version": "v2", "refcount-bits": 8},
            "Different refcount widths than 16 bits require compatibility level 1.1 or above "
            "(use version=v3 or greater)",
        ),
        (
            {"size": MiB, "refcount-bits": 3},
            "Refcount width must be a power of two and may not exceed 64 bits",
        ),
        (
            {"size": MiB, "refcount-bits": 128},
            "Refcount width must be a power of two and may not exceed 64 bits",
        ),
        (
            {"size": MiB, "backing-fmt": "qcow2"},
            "Backing format cannot be used without backing file",
        ),
        (
            {"size": MiB, "version": "v2", "compression-type": "zstd"},
            "Non-zlib compression type is only supported with compatibility level 1.1 and above "
            "(use version=v3 or greater)",
        ),
        (
            {"size": MiB, "preallocation": "metadata", "backing-file": "x"},
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ),
        ({"size": 1 << 60}, "Could not resize image: Failed to grow the L1 table: File too large"),
        (
            {"size": MiB, "extended-l2": True, "cluster-size": 512},
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ),
    ],
)
async def test_create_errors_use_qemu_texts(tmp_path, opts, message):
    graph = BlockGraph()
    with pytest.raises(QmpError) as exc:
        await blockdev_create(graph, str(tmp_path / "x.qcow2"), opts)
    assert exc.value.desc == message
    await graph.close_all()
