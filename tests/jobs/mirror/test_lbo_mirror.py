"""The drive-mirror, blockdev-mirror and live storage migration examples of QEMU's
live-block-operations.rst, typed into qmp-shell as the document shows them, over the chain
[A] <- [B] <- [C] <- [D] with a guest writing through an NBD export. Results are checked with
``qemu-img compare``, ``qemu-img info --backing-chain`` and the events qmp-shell printed.

Live storage migration runs blockd to blockd, qemu-storage-daemon to blockd and blockd to
qemu-storage-daemon: the destination exports its image over NBD, the source mirrors sync=top
with mode=existing into the document's legacy ``nbd:HOST:PORT:exportname=NAME`` target, and a
cancel after READY leaves the destination a point-in-time copy."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from lbo import (
    build_chain,
    chain_files,
    daemon_in,
    identical,
    job_events,
    lbo_daemon,
    run,
)
from support import qemu_img
from support import run as run_tool

MiB = 1024 * 1024


@pytest.mark.parametrize("end", ["complete", pytest.param("cancel", marks=pytest.mark.slow)])
def test_drive_mirror_full(tmp_path: Path, end: str) -> None:
    """``drive-mirror device=node-D target=e.qcow2 sync=full``: READY, then either the guest
    moves to [E] (complete) or [E] is the chain as it was at the cancel."""
    with lbo_daemon(tmp_path) as (_, shell, guest):
        build_chain(shell, guest)
        run(shell, "drive-mirror device=node-D target=e.qcow2 sync=full job-id=job0")
        job_events(shell, "job0", "BLOCK_JOB_READY")
        (job,) = run(shell, "query-block-jobs")
        assert (job["type"], job["ready"], job["busy"]) == ("mirror", True, False)
        assert job["len"] == job["offset"] > 0
        guest.write([(0x5E, 6 * MiB, MiB)])
        at_end = guest.snapshot(tmp_path / "at_end.raw")
        run(shell, f"block-job-{end} device=job0")
        evs = job_events(shell, "job0", "BLOCK_JOB_COMPLETED")
        assert [e["event"] for e in evs] == ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"]
        assert "error" not in evs[-1]["data"]
        assert run(shell, "query-block-jobs") == []
        guest.write([(0x6E, 0, 4096)])
        after = guest.snapshot(tmp_path / "after.raw")
        (export,) = run(shell, "query-block-exports")
        run(shell, "quit")
    assert chain_files(tmp_path / "e.qcow2") == [("e.qcow2", None)]
    if end == "complete":
        assert export["node-name"] != "node-D"
        assert identical(tmp_path / "e.qcow2", after)
    else:
        assert export["node-name"] == "node-D"
        assert identical(tmp_path / "e.qcow2", at_end)
        assert identical(tmp_path / "d.qcow2", after)


@pytest.mark.parametrize("sync", ["top", "none"])
def test_drive_mirror_top_and_none(tmp_path: Path, sync: str) -> None:
    """sync=top copies only [D] into a new image backed by [C]; sync=none only what the
    guest writes from now on, into an image backed by [D]. Complete (top) or cancel (none)
    leaves a chain that reads as the guest's disk did."""
    end = "complete" if sync == "top" else "cancel"
    with lbo_daemon(tmp_path) as (_, shell, guest):
        build_chain(shell, guest)
        run(shell, f"drive-mirror device=node-D target=e.qcow2 sync={sync} job-id=job0")
        ready = job_events(shell, "job0", "BLOCK_JOB_READY")[-1]["data"]
        guest.write([(0x7E, 10 * MiB, MiB)])
        at_end = guest.snapshot(tmp_path / "at_end.raw")
        run(shell, f"block-job-{end} device=job0")
        evs = job_events(shell, "job0", "BLOCK_JOB_COMPLETED")
        assert [e["event"] for e in evs] == ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"]
        run(shell, "quit")
    backing = "c.qcow2" if sync == "top" else "d.qcow2"
    assert chain_files(tmp_path / "e.qcow2")[0] == ("e.qcow2", backing)
    assert identical(tmp_path / "e.qcow2", at_end)
    # top: only [D]'s data was copied before READY; none: nothing
    assert ready["len"] == (MiB + 64 * 1024 if sync == "top" else 0)


def test_blockdev_mirror(tmp_path: Path) -> None:
    """The document's blockdev-mirror flow: qemu-img creates [E], blockdev-add, mirror
    sync=full, query, complete, quit, then qemu-img compare says the images are identical."""
    with lbo_daemon(tmp_path) as (_, shell, guest):
        build_chain(shell, guest)
        qemu_img("create", "-f", "qcow2", tmp_path / "e.qcow2", "16M")
        e_file = '{"driver":"file","filename":"e.qcow2"}'
        run(shell, f"blockdev-add driver=qcow2 node-name=node-E file={e_file}")
        run(shell, "blockdev-mirror device=node-D target=node-E sync=full job-id=job0")
        job_events(shell, "job0", "BLOCK_JOB_READY")
        (job,) = run(shell, "query-block-jobs")
        assert job["ready"] is True and job["len"] == 16 * MiB
        run(shell, "block-job-complete device=job0")
        job_events(shell, "job0", "BLOCK_JOB_COMPLETED")
        disk = guest.snapshot(tmp_path / "disk.raw")
        run(shell, "quit")
    out = run_tool("qemu-img", "compare", "d.qcow2", "e.qcow2", cwd=tmp_path).stdout
    assert out.strip() == "Images are identical."
    assert identical(tmp_path / "e.qcow2", disk)


def _free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::", 0))
        return int(s.getsockname()[1])


def _migrate(tmp_path: Path, src_kind: str, dst_kind: str) -> None:
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst_dir.mkdir()
    port = _free_port()
    with lbo_daemon(src_dir, src_kind) as (_, src, guest):
        build_chain(src, guest)
        # the destination host has [A] <- [B] <- [C] by other means
        qemu_img(
            "convert", "-U", "-O", "qcow2", src_dir / "c.qcow2", dst_dir / "Contents-of-A-B-C.qcow2"
        )
        run_tool(
            "qemu-img",
            "create",
            "-f",
            "qcow2",
            "-b",
            "./Contents-of-A-B-C.qcow2",
            "-F",
            "qcow2",
            "./target-disk.qcow2",
            cwd=dst_dir,
        )
        with daemon_in(dst_dir, "node-TargetDisk", "./target-disk.qcow2", dst_kind) as (_, dst):
            run(
                dst,
                f'nbd-server-start addr={{"type":"inet","data":{{"host":"::","port":"{port}"}}}}',
            )
            run(dst, "nbd-server-add device=node-TargetDisk writable=true")
            run(
                src,
                f"drive-mirror device=node-D target=nbd:localhost:{port}:exportname=node-TargetDisk"
                " sync=top mode=existing job-id=job0",
            )
            job_events(src, "job0", "BLOCK_JOB_READY")
            guest.write([(0x8E, 11 * MiB, MiB)])  # mirrored while the job runs
            at_cancel = guest.snapshot(src_dir / "at_cancel.raw")
            run(src, "block-job-cancel device=job0")
            evs = job_events(src, "job0", "BLOCK_JOB_COMPLETED")
            assert [e["event"] for e in evs] == ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"]
            assert "error" not in evs[-1]["data"]
            guest.write([(0x9E, 0, MiB)])  # after the cancel: not on the destination
            run(dst, "nbd-server-stop")
            run(dst, "quit")
        run(src, "quit")
    assert chain_files(dst_dir / "target-disk.qcow2") == [
        ("target-disk.qcow2", "./Contents-of-A-B-C.qcow2"),
        ("Contents-of-A-B-C.qcow2", None),
    ]
    assert identical(dst_dir / "target-disk.qcow2", at_cancel)


def test_live_storage_migration_blockd_to_blockd(tmp_path: Path) -> None:
    _migrate(tmp_path, "blockd", "blockd")


@pytest.mark.parametrize(("src", "dst"), [("qsd", "blockd"), ("blockd", "qsd")])
def test_live_storage_migration_with_qsd(tmp_path: Path, src: str, dst: str) -> None:
    _migrate(tmp_path, src, dst)
