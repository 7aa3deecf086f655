"""The block-commit examples of QEMU's live-block-operations.rst, typed into qmp-shell
against blockd as the document shows them, over the document's chain [A] <- [B] <- [C] <- [D]
with a guest writing through an NBD export. Results are checked with ``qemu-img compare``,
``qemu-img info --backing-chain`` and the events qmp-shell printed."""

from __future__ import annotations

from pathlib import Path

from lbo import build_chain, chain_files, identical, job_events, lbo_daemon, run


def test_intermediate_commit_b_into_a(tmp_path: Path) -> None:
    """Case 1: [B] into [A]; [C] then backs onto [A]; the guest sees the same data."""
    with lbo_daemon(tmp_path) as (_, shell, guest):
        build_chain(shell, guest)
        before = guest.snapshot(tmp_path / "before.raw")
        run(shell, "block-commit device=node-D base=a.qcow2 top=b.qcow2 job-id=job0")
        evs = job_events(shell, "job0", "BLOCK_JOB_COMPLETED")
        assert [e["event"] for e in evs] == ["BLOCK_JOB_COMPLETED"]
        assert "error" not in evs[0]["data"]
        assert evs[0]["data"]["len"] == evs[0]["data"]["offset"] > 0
        assert run(shell, "query-block-jobs") == []
        assert identical(before, guest.snapshot(tmp_path / "after.raw"), "raw")
        run(shell, "quit")
    assert chain_files(tmp_path / "d.qcow2") == [
        ("d.qcow2", "c.qcow2"),
        ("c.qcow2", "./a.qcow2"),  # the base's file name as node-A was opened
        ("a.qcow2", None),
    ]
    assert identical(tmp_path / "d.qcow2", tmp_path / "before.raw")


def test_active_commit_complete(tmp_path: Path) -> None:
    """Case 3: [B], [C] and the active [D] into [A], two-phase: READY, ``ready: true`` in
    query-block-jobs, block-job-complete; [A] then holds everything the guest wrote."""
    with lbo_daemon(tmp_path) as (_, shell, guest):
        build_chain(shell, guest)
        run(shell, "block-commit device=node-D base=a.qcow2 top=d.qcow2 job-id=job0")
        job_events(shell, "job0", "BLOCK_JOB_READY")
        (job,) = run(shell, "query-block-jobs")
        assert job["ready"] is True and job["type"] == "commit"
        assert job["len"] == job["offset"] and job["io-status"] == "ok"
        guest.write([(0xE1, 5 * 1024 * 1024, 1024 * 1024)])  # lands in [D], committed too
        before = guest.snapshot(tmp_path / "before.raw")
        run(shell, "block-job-complete device=job0")
        evs = job_events(shell, "job0", "BLOCK_JOB_COMPLETED")
        assert [e["event"] for e in evs] == ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"]
        assert "error" not in evs[-1]["data"]
        assert run(shell, "query-block-jobs") == []
        (export,) = run(shell, "query-block-exports")
        assert export["node-name"] == "node-A"
        guest.write([(0xE2, 9 * 1024 * 1024, 4096)])  # now goes straight to [A]
        after = guest.snapshot(tmp_path / "after.raw")
        run(shell, "quit")
    assert chain_files(tmp_path / "a.qcow2") == [("a.qcow2", None)]
    assert identical(tmp_path / "a.qcow2", after)
    assert not identical(tmp_path / "a.qcow2", before)  # the last write is there too


def test_active_commit_cancel_keeps_active_layer(tmp_path: Path) -> None:
    """block-job-cancel after READY: BLOCK_JOB_COMPLETED, the guest stays on [D]; [A] holds
    the chain as it was at the cancel."""
    with lbo_daemon(tmp_path) as (_, shell, guest):
        build_chain(shell, guest)
        run(shell, "block-commit device=node-D base=a.qcow2 top=d.qcow2 job-id=job0")
        job_events(shell, "job0", "BLOCK_JOB_READY")
        before = guest.snapshot(tmp_path / "before.raw")
        run(shell, "block-job-cancel device=job0")
        evs = job_events(shell, "job0", "BLOCK_JOB_COMPLETED")
        assert [e["event"] for e in evs] == ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"]
        (export,) = run(shell, "query-block-exports")
        assert export["node-name"] == "node-D"
        guest.write([(0xF1, 0, 65536)])
        run(shell, "quit")
    assert chain_files(tmp_path / "d.qcow2") == [
        ("d.qcow2", "c.qcow2"),
        ("c.qcow2", "b.qcow2"),
        ("b.qcow2", "./a.qcow2"),
        ("a.qcow2", None),
    ]
    assert identical(tmp_path / "a.qcow2", before)
