"""``blockdev-create`` with ``driver: vmdk``: the files blockd makes are byte for byte the
files ``qemu-img create -f vmdk`` and qemu-storage-daemon's blockdev-create make (apart from
the random CID), for every subformat and option; they pass ``qemu-img check``; job errors
carry QSD's texts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import check_image, qemu_img
from vmdktest import SIDES, GiB, MiB, Pair, same_files


def _create(pair: Pair, side: str, job: str, options: dict[str, Any]) -> str | None:
    """Run a create job on one daemon; its error text, or None."""
    q = pair.qmp[side]
    q.run("blockdev-create", {"job-id": job, "options": options})
    while True:
        ev = q.wait_event("JOB_STATUS_CHANGE", timeout=60)
        if ev["data"]["id"] == job and ev["data"]["status"] == "concluded":
            break
    jobs = q.run("query-jobs")["return"]
    err = next(j for j in jobs if j["id"] == job).get("error")
    q.run("job-dismiss", {"id": job})
    return str(err) if err is not None else None


def _files(pair: Pair, side: str, d: Path, names: list[str]) -> list[str]:
    """Empty files *names* in *d*, each opened as a file node; their node names."""
    out = []
    for i, name in enumerate(names):
        path = str(d / name)
        assert _create(pair, side, f"f{i}", {"driver": "file", "filename": path, "size": 0}) is None
        node = f"{d.name}-{i}"
        pair.qmp[side].run("blockdev-add", {"driver": "file", "node-name": node, "filename": path})
        out.append(node)
    return out


def _drop_files(pair: Pair, side: str, nodes: list[str]) -> None:
    for node in nodes:
        pair.qmp[side].run("blockdev-del", {"node-name": node})


# (subformat, size, qemu-img -o options, blockdev-create options)
MATRIX: list[tuple[str, int, str, dict[str, Any]]] = [
    ("monolithicSparse", 100 * MiB + 512, "", {}),
    (
        "monolithicSparse",
        64 * MiB,
        "zeroed_grain=on,adapter_type=lsilogic",
        {"zeroed-grain": True, "adapter-type": "lsilogic"},
    ),
    (
        "monolithicSparse",
        8 * GiB,
        "hwversion=6,toolsversion=10240",
        {"hwversion": "6", "toolsversion": "10240"},
    ),
    ("streamOptimized", 300 * MiB, "adapter_type=buslogic", {"adapter-type": "buslogic"}),
    ("monolithicFlat", 33 * MiB, "adapter_type=legacyESX", {"adapter-type": "legacyESX"}),
    ("twoGbMaxExtentSparse", 5 * GiB + 4096, "", {}),
    ("twoGbMaxExtentFlat", 4 * GiB, "", {}),
]


def _extent_names(subformat: str, size: int) -> list[str]:
    if subformat == "monolithicFlat":
        return ["img-flat.vmdk"]
    if subformat.startswith("twoGb"):
        kind = "f" if subformat.endswith("Flat") else "s"
        return [f"img-{kind}{i:03d}.vmdk" for i in range(1, -(-size // (2 * GiB)) + 1)]
    return []


@pytest.mark.parametrize(
    "subformat,size,img_opts,opts", MATRIX, ids=[f"{m[0]}-{i}" for i, m in enumerate(MATRIX)]
)
def test_create_as_qemu_img(
    pair: Pair, tmp_path: Path, subformat: str, size: int, img_opts: str, opts: dict[str, Any]
) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    o = f"subformat={subformat}" + (f",{img_opts}" if img_opts else "")
    qemu_img("create", "-q", "-f", "vmdk", "-o", o, ref / "img.vmdk", str(size))
    extents = _extent_names(subformat, size)
    for side in SIDES:
        d = tmp_path / side
        d.mkdir()
        desc, *ext = _files(pair, side, d, ["img.vmdk", *extents])
        options = {"driver": "vmdk", "file": desc, "size": size, "subformat": subformat, **opts}
        if ext:
            options["extents"] = ext
        assert _create(pair, side, "c", options) is None, side
        _drop_files(pair, side, [desc, *ext])
        for name in ["img.vmdk", *extents]:
            same_files(d / name, ref / name)
        assert check_image(d / "img.vmdk")["rc"] == 0
        info = qemu_img("info", "--output=json", d / "img.vmdk").stdout
        assert f'"virtual-size": {size}' in info


def test_create_inline_and_backing(pair: Pair, tmp_path: Path) -> None:
    """Inline file options, and a delta of a vmdk parent: its parentCID is the parent's."""
    ref = tmp_path / "ref"
    ref.mkdir()
    qemu_img("create", "-q", "-f", "vmdk", ref / "base.vmdk", "16M")
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", ref / "top.vmdk")
    for side in SIDES:
        d = tmp_path / side
        d.mkdir()
        (d / "base.vmdk").write_bytes((ref / "base.vmdk").read_bytes())
        (d / "top.vmdk").touch()
        options = {
            "driver": "vmdk",
            "file": {"driver": "file", "filename": str(d / "top.vmdk")},
            "size": 16 * MiB,
            "backing-file": "base.vmdk",
        }
        assert _create(pair, side, "c", options) is None, side
        same_files(d / "top.vmdk", ref / "top.vmdk")
        qemu_img("compare", "-f", "vmdk", "-F", "vmdk", d / "top.vmdk", ref / "base.vmdk")


ERRORS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("size", {"size": 1000}, []),
    ("flat zeroed", {"subformat": "monolithicFlat", "zeroed-grain": True}, ["x-flat.vmdk"]),
    ("flat backing", {"subformat": "twoGbMaxExtentFlat", "backing-file": "b.vmdk"}, ["e.vmdk"]),
    ("unused extents", {"subformat": "monolithicSparse"}, ["e.vmdk"]),
    ("missing extents", {"subformat": "twoGbMaxExtentSparse", "size": 3 * GiB}, ["e1.vmdk"]),
    ("no extents", {"subformat": "monolithicFlat"}, []),
    ("raw parent", {"backing-file": "raw.img"}, []),
    ("missing parent", {"backing-file": "nothing.vmdk"}, []),
]


@pytest.mark.parametrize("what,extra,extents", ERRORS, ids=[e[0] for e in ERRORS])
def test_create_errors_as_qsd(
    pair: Pair, tmp_path: Path, what: str, extra: dict[str, Any], extents: list[str]
) -> None:
    errs = {}
    for side in SIDES:
        d = tmp_path / side
        d.mkdir()
        (d / "raw.img").write_bytes(bytes(65536))
        desc, *ext = _files(pair, side, d, ["x.vmdk", *extents])
        options: dict[str, Any] = {"driver": "vmdk", "file": desc, "size": 64 * MiB, **extra}
        if ext:
            options["extents"] = ext
        errs[side] = _create(pair, side, "c", options)
        _drop_files(pair, side, [desc, *ext])
    assert errs["qsd"] is not None, what
    assert errs["blockd"] == errs["qsd"].replace(str(tmp_path / "qsd"), str(tmp_path / "blockd"))
