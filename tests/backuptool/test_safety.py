"""Runs that are stopped or crowded out: ctrl-c and ``kill -9`` of the tool in the middle of
a run, a second run while one holds the directory, a monitor another client holds (QSD serves
one client at a time; blockd serves all), and no daemon at all. The chain stays usable, no
partial file and nothing of the tool in the daemon is left behind, and the next run is a full
backup that says why.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from bblab import TOOL, Lab, MiB
from diffsupport import Session
from support import ROOT


def _throttled(lab: Lab) -> subprocess.Popen[str]:
    """A run that is still copying when the test acts on it."""
    proc, _ = lab.start_tool(*lab.backup_args("--json", "--speed", "128K"), until="started")
    return proc


def _ours_in_daemon(lab: Lab) -> list[str]:
    prefix = f"bb{json.loads((lab.dir / 'blockd-backup.json').read_text())['id']}-"
    jobs = [j["id"] for j in lab.qmp("query-jobs")]
    nodes = [n["node-name"] for n in lab.qmp("query-named-block-nodes", {"flat": True})]
    return [x for x in jobs + nodes if x.startswith(prefix)]


def test_interrupted_and_killed_runs(lab: Lab) -> None:
    lab.add_disk("disk0", 16 * MiB, fill=4 * MiB)
    lab.snapshot(1)
    lab.backup()
    before = lab.files()
    lab.write_random("disk0")

    proc = _throttled(lab)
    # a second run is refused while the first holds the directory; readers are not
    second = lab.backup(ok=False)
    assert second.returncode == 4, second.stderr
    assert f"is in use by a backup or prune (pid {proc.pid})" in second.stderr
    lab.tool("verify", lab.dir)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "point 2 interrupted; the partial backup was removed" in out  # a JSON note
    assert lab.files() == before
    assert _ours_in_daemon(lab) == []

    proc = _throttled(lab)
    proc.kill()  # the tool dies with its job running in the daemon and its files half written
    proc.wait()
    assert _ours_in_daemon(lab) != [] and lab.files() != before
    lab.snapshot(2)
    res = lab.backup()
    assert "the run for point 2 was interrupted; removing its partial files" in res.stderr
    assert "removing what an interrupted run left in the daemon: 1 job(s)" in res.stderr
    assert "full backup: the previous run failed (the run for point 2 was interrupted)" in (
        res.stderr
    )
    assert _ours_in_daemon(lab) == []
    for point in (1, 2):
        lab.restore_equals(point, lab.copies[point]["disk0"])
    lab.tool("verify", lab.dir)


def test_busy_monitor(lab: Lab) -> None:
    lab.add_disk("disk0", 8 * MiB)
    holder = Session(lab.sock)  # another client, holding the monitor
    try:
        proc = subprocess.Popen(
            [*TOOL, "backup", "--socket", str(lab.sock), "--node", "disk0", "--dir", str(lab.dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        time.sleep(1.5)
        waiting = proc.poll() is None
        holder.ok("query-version")  # the holder still works
    finally:
        holder.close()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    if lab.kind == "qsd":
        assert waiting, "the tool did not wait for QSD's monitor"
        assert "is busy (another client); waiting" in err
    else:
        assert "is busy" not in err  # blockd serves every client at once
    assert "point 1 done: full" in out

    holder = Session(lab.sock)
    try:
        res = lab.backup("--busy-timeout", "1", ok=False)
    finally:
        holder.close()
    if lab.kind == "qsd":
        assert res.returncode == 5 and "stayed busy for 1 s" in res.stderr, res.stderr
    else:
        assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("lab", ["blockd"], indirect=True)  # no daemon involved
def test_no_daemon(lab: Lab) -> None:
    res = lab.tool(
        "backup", "--socket", lab.tmp / "none.sock", "--node", "d", "--dir", lab.dir, ok=False
    )
    assert res.returncode == 5
    assert res.stderr == (
        f"blockd-backup: no daemon answers on {lab.tmp / 'none.sock'} (No such file or directory)\n"
    )
    res = lab.tool("backup", "--socket", lab.sock, "--node", "nosuch", "--dir", lab.dir, ok=False)
    assert res.returncode == 1 and "the daemon has no node 'nosuch'" in res.stderr
