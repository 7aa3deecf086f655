"""A backup whose target's disk fills up fails with ENOSPC and leaves a target that
``qemu-img check`` finds clean, as qemu-storage-daemon's is: no cluster counted but never
referenced (a new L2 table used to be written only at the next flush, which then failed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffsupport import MiB, Session, completed, qcow2_image, qcow2_node, raw_image, raw_node, start
from smallfs import small_tmpfs
from support import check_image


@pytest.mark.parametrize("kind", ["qsd", "blockd"])
def test_target_of_enospc_backup_is_clean(tmp_path: Path, kind: str) -> None:
    with small_tmpfs(tmp_path / "fs", "4m") as fs:
        src = raw_image(tmp_path / "src.raw", 16 * MiB, [(0x11, 0, 8 * MiB)])
        tgt = qcow2_image(fs / "t.qcow2", 16 * MiB)
        d = start(kind, tmp_path)
        try:
            s = Session(d.sock)
            s.ok("blockdev-add", raw_node("src", src))
            s.ok("blockdev-add", qcow2_node("tgt", tgt))
            s.ok(
                "blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}
            )
            s.wait(lambda e: e["event"] == "BLOCK_JOB_COMPLETED")
            assert completed(s, "j")["error"] == "No space left on device"
            s.ok("blockdev-del", {"node-name": "tgt"})
            s.close()
        finally:
            assert d.stop() == 0
        res = check_image(tgt)
        assert res["rc"] == 0 and "leaks" not in res, res
