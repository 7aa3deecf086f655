"""blockd exports seen through QEMU's and libnbd's tools: nbdinfo, qemu-img, qemu-io, over
Unix sockets and TCP, compared with the image itself and with a QSD export of the same image."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from nbdtest import Qmp, daemon, free_port, make_raw, map_of, tcp_uri, uri
from support import qemu_img, qemu_io, run


def _make_image(tmp: Path, fmt: str) -> Path:
    raw = make_raw(tmp / "img.raw", 64 << 20)
    if fmt == "raw":
        return raw
    q = tmp / "img.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, q)
    qemu_io("-f", "qcow2", "-c", "write -z 30M 1M", "-c", "write -P 0x33 40M 64k", q)
    return q


def _serve(
    q: Qmp,
    image: Path,
    fmt: str,
    transport: str,
    tmp: Path,
    tag: str,
    writable: bool = False,
    **export: Any,
) -> str:
    node: dict[str, Any] = {
        "driver": fmt,
        "node-name": "src",
        "file": {"driver": "file", "filename": str(image)},
    }
    if writable:
        # (blockd children do not inherit discard=unmap yet; QEMU's do: set it on both.)
        node["discard"] = "unmap"
        node["file"]["discard"] = "unmap"
    q.run("blockdev-add", node)
    if transport == "unix":
        sock = tmp / f"{tag}.nbd.sock"
        q.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        target = uri(sock, "src")
    else:
        port = free_port()
        q.run(
            "nbd-server-start",
            {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}},
        )
        target = tcp_uri(port, "src")
    q.run(
        "block-export-add",
        {"type": "nbd", "id": "e0", "node-name": "src", "writable": writable, **export},
    )
    return target


FORMATS = ["raw", "qcow2"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_map_and_info_match_image(tmp_path: Path, fmt: str, transport: str) -> None:
    image = _make_image(tmp_path, fmt)
    want = map_of(str(image), fmt)
    with daemon(tmp_path, "blockd") as (_d, q):
        target = _serve(q, image, fmt, transport, tmp_path, "b", **{"allocation-depth": True})
        assert map_of(target) == want
        info = qemu_img("info", "--output=json", "-f", "raw", target).stdout
        assert '"virtual-size": 67108864' in info
        nbd_map = run("nbdinfo", "--map", target).stdout
        depth_map = run("nbdinfo", "--map=qemu:allocation-depth", target).stdout
        listing = run("nbdinfo", "--list", target).stdout
        assert 'export="src"' in listing
        # Convert over NBD, then compare byte for byte with the image.
        out = tmp_path / "copy.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", target, out)
        # blockd holds the image open read-write (a writable qcow2 node takes the write lock
        # at open, as in QEMU): reading it beside the daemon needs -U.
        qemu_img("compare", "-U", "-f", fmt, "-F", "raw", image, out)
        qemu_img("compare", "-U", "-f", fmt, "-F", "raw", image, target)
    # nbdinfo --map of the same image exported by QSD is the reference.
    with daemon(tmp_path, "qsd") as (_d, q):
        target = _serve(q, image, fmt, transport, tmp_path, "q", **{"allocation-depth": True})
        assert run("nbdinfo", "--map", target).stdout == nbd_map
        assert run("nbdinfo", "--map=qemu:allocation-depth", target).stdout == depth_map
    holes = [line for line in nbd_map.splitlines() if "hole" in line]
    assert holes and any("data" in line for line in nbd_map.splitlines())


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_qemu_io_read_write(tmp_path: Path, transport: str) -> None:
    image = make_raw(tmp_path / "w.raw", 32 << 20)
    with daemon(tmp_path, "blockd") as (_d, q):
        target = _serve(q, image, "raw", transport, tmp_path, "b", writable=True)
        # 64 concurrent writes of distinct patterns, then every byte checked.
        cmds = []
        for k in range(64):
            cmds += ["-c", f"aio_write -P {k + 1} {k * 96}k 96k"]
        qemu_io("-f", "raw", *cmds, "-c", "aio_flush", target)
        checks = []
        for k in range(64):
            checks += ["-c", f"read -P {k + 1} {k * 96}k 96k"]
        qemu_io("-f", "raw", *checks, target)
        qemu_io(
            "-f",
            "raw",
            "-c",
            "write -P 0xab 10M 1M",
            "-c",
            "read -P 0xab 10M 1M",
            "-c",
            "writev -P 0xcd 12M 4k 8k 64k",
            "-c",
            "readv -P 0xcd 12M 64k 12k",
            "-c",
            "write -z 10M 64k",
            "-c",
            "read -P 0 10M 64k",
            "-c",
            "write -z -u 10M 512k",
            "-c",
            "read -P 0 10M 512k",
            "-c",
            "read -P 0xab 10752k 512k",
            "-c",
            "discard 12M 1M",
            "-c",
            "read -P 0 12M 1M",
            "-c",
            "write -P 0x11 31M 1M",
            "-c",
            "flush",
            target,
        )
        # Past the end: the client refuses before sending; the export stays usable.
        res = qemu_io("-f", "raw", "-c", "write 32M 4k", target, check=False)
        assert (
            "Input/output error" in res.stdout
            or "out of range" in res.stdout.lower()
            or "failed" in res.stdout.lower()
        )
        qemu_io("-f", "raw", "-c", "read -P 0x11 31M 1M", target)
    # After the daemon is gone, the file itself holds the data.
    qemu_io(
        "-f",
        "raw",
        "-c",
        "read -P 0x11 31M 1M",
        "-c",
        "read -P 64 6048k 96k",
        "-c",
        "read -P 0xab 10752k 512k",
        image,
    )


def test_read_only_export_refuses_writes(tmp_path: Path) -> None:
    image = make_raw(tmp_path / "r.raw", 8 << 20)
    with daemon(tmp_path, "blockd") as (_d, q):
        target = _serve(q, image, "raw", "unix", tmp_path, "b")
        res = qemu_io("-f", "raw", "-c", "write 0 4k", target, check=False)
        assert (
            "Permission denied" in res.stdout + res.stderr
            or "read-only" in (res.stdout + res.stderr).lower()
        )
        res = subprocess.run(
            ["qemu-io", "-r", "-f", "raw", "-c", "read 0 64k", target],
            capture_output=True,
            text=True,
        )
        assert "read 65536/65536" in res.stdout


def test_writethrough_and_export_follows_file(tmp_path: Path) -> None:
    image = make_raw(tmp_path / "t.raw", 8 << 20)
    with daemon(tmp_path, "blockd") as (_d, q):
        target = _serve(q, image, "raw", "unix", tmp_path, "b", writable=True, writethrough=True)
        qemu_io("-f", "raw", "-c", "write -P 0x42 0 1M", target)
        # Writethrough: on disk (page cache at least) once acknowledged; readable with -U.
        qemu_io("-U", "-r", "-f", "raw", "-c", "read -P 0x42 0 1M", image)
