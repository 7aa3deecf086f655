"""Block jobs onto ssh targets: a backup and a mirror beside qemu-storage-daemon, and a
connection that dies in the middle of a backup (the server side killed), which must end the
job by its error policy within seconds while the daemon keeps serving and keeps no
connection."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from diffsupport import Session, compare, completed, raw_image, raw_node
from sshlab import SshLab, connections
from sshtest import Pair
from support import start_blockd
from test_ssh_io import raw_on_ssh

MiB = 1024 * 1024


def _copy_onto_ssh(
    lab: SshLab, pair: Pair, tmp_path: Path, verb: str, read_only_source: bool
) -> None:
    """On both daemons, *verb* (blockdev-backup or blockdev-mirror, completed after READY)
    from a local raw image onto a raw node on ssh: the same outcome, and the remote file equal
    to the source."""
    src = raw_image(
        tmp_path / "src.raw", 24 * MiB, [(0x31, 0, 3 * MiB), (0x32, 10 * MiB + 512, 5 * MiB)]
    )
    got = {}
    for kind, s in pair.sessions.items():
        tgt = raw_image(tmp_path / f"{kind}-tgt.raw", 24 * MiB)
        s.ok("blockdev-add", raw_node(f"{kind}src", src, **{"read-only": read_only_source}))
        s.ok("blockdev-add", raw_on_ssh(lab, f"{kind}tgt", tgt))
        # the session's event log outlives a test: every job needs an id of its own
        job = f"{kind}-{verb}"
        s.ok(verb, {"job-id": job, "device": f"{kind}src", "target": f"{kind}tgt", "sync": "full"})
        if verb == "blockdev-mirror":
            s.wait_job(job, "ready")
            s.ok("block-job-complete", {"device": job})
        s.wait_job(job, "null")
        done = completed(s, job)
        s.ok("blockdev-del", {"node-name": f"{kind}tgt"})
        s.ok("blockdev-del", {"node-name": f"{kind}src"})
        got[kind] = (done.get("error"), done["offset"], compare(src, tgt))
    assert got["blockd"] == got["qsd"] == (None, 24 * MiB, True)


def test_backup_onto_ssh_target(lab: SshLab, pair: Pair, tmp_path: Path) -> None:
    _copy_onto_ssh(lab, pair, tmp_path, "blockdev-backup", read_only_source=True)


def test_mirror_onto_ssh_target(lab: SshLab, pair: Pair, tmp_path: Path) -> None:
    _copy_onto_ssh(lab, pair, tmp_path, "blockdev-mirror", read_only_source=False)


def _backup_until_progress(s: Session, job: str, src: str, tgt: str, policy: str) -> None:
    s.ok(
        "blockdev-backup",
        {
            "job-id": job,
            "device": src,
            "target": tgt,
            "sync": "full",
            "speed": 8 * MiB,
            "on-target-error": policy,
            "auto-dismiss": False,
        },
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        jobs = {j["device"]: j for j in s.ok("query-block-jobs")}
        if jobs[job]["offset"] > 0:
            return
        time.sleep(0.05)
    raise AssertionError("backup made no progress")


def test_connection_dropped_mid_backup(lab: SshLab, tmp_path: Path) -> None:
    daemon = start_blockd(tmp_path, env=lab.env())
    s = Session(daemon.sock)
    try:
        src = raw_image(tmp_path / "src.raw", 64 * MiB, [(0x41, 0, 64 * MiB)])
        s.ok("blockdev-add", raw_node("src", src, **{"read-only": True}))
        results: dict[str, Any] = {}
        for policy in ("report", "stop"):
            tgt = raw_image(tmp_path / f"tgt-{policy}.raw", 64 * MiB)
            s.ok("blockdev-add", raw_on_ssh(lab, f"t{policy}", tgt))
            job = f"drop-{policy}"
            _backup_until_progress(s, job, "src", f"t{policy}", policy)
            assert lab.kill_sessions() > 0
            t0 = time.monotonic()
            if policy == "report":
                s.wait_job(job, "concluded", timeout=15)
                done = completed(s, job)
                results[policy] = (done.get("error"), time.monotonic() - t0)
            else:
                err = s.wait(
                    lambda e, j=job: e["event"] == "BLOCK_JOB_ERROR" and e["data"]["device"] == j,
                    timeout=15,
                )
                s.wait_job(job, "paused", timeout=15)
                results[policy] = (err["data"], time.monotonic() - t0)
                s.ok("job-cancel", {"id": job})  # force: a paused backup ends at once
                s.wait_job(job, "concluded", timeout=15)
            s.ok("job-dismiss", {"id": job})
            # the node with the dead connection goes away without hanging
            s.ok("blockdev-del", {"node-name": f"t{policy}"})
        assert results["report"][0] == "Input/output error"
        assert results["stop"][0] == {
            "device": "drop-stop",
            "operation": "write",
            "action": "stop",
        }
        assert all(took < 10 for _, took in results.values()), results
        # the daemon keeps serving, over ssh too, and holds no connection once the node is gone
        tgt = raw_image(tmp_path / "after.raw", MiB)
        s.ok("blockdev-add", raw_on_ssh(lab, "after", tgt))
        assert connections(daemon.proc.pid, lab.port) == 1
        s.ok("blockdev-del", {"node-name": "after"})
        s.ok("blockdev-del", {"node-name": "src"})
        assert connections(daemon.proc.pid, lab.port) == 0
    finally:
        s.close()
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
