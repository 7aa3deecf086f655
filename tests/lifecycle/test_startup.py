"""Start-up: ``--blockdev`` errors in qemu-storage-daemon's form (the option as typed, and
for a lock conflict the question whether another process uses the image), and the QMP socket
served only once the ``--blockdev`` nodes are open."""

from __future__ import annotations

from pathlib import Path

from diffsupport import MiB, Session, qcow2_image
from lifesupport import lines, qsd_monitor_args, run_blockd, run_qsd
from support import start_blockd, start_qsd


def _spec(img: Path, driver: str = "qcow2") -> str:
    return f"driver={driver},node-name=d,file.driver=file,file.filename={img}"


def test_missing_image_names_it_like_qsd(tmp_path: Path) -> None:
    spec = f"driver=file,node-name=d,filename={tmp_path / 'missing.img'}"
    b = run_blockd("--socket", tmp_path / "b.sock", "--blockdev", spec)
    q = run_qsd("--blockdev", spec, *qsd_monitor_args(tmp_path / "q.sock"))
    assert b.returncode == q.returncode == 1
    assert lines(b.stderr) == [
        f"blockd: --blockdev {spec}: Could not open '{tmp_path}/missing.img'"
        ": No such file or directory"
    ]
    assert [ln.removeprefix("blockd: ") for ln in lines(b.stderr)] == [
        ln.removeprefix("qemu-storage-daemon: ") for ln in lines(q.stderr)
    ]
    assert not (tmp_path / "b.sock").exists()


def test_locked_image_asks_whether_another_process_uses_it(tmp_path: Path) -> None:
    img = qcow2_image(tmp_path / "a.qcow2", 16 * MiB)
    holder = start_qsd(
        tmp_path,
        "--blockdev",
        _spec(img),
        "--nbd-server",
        f"addr.type=unix,addr.path={tmp_path / 'n.sock'}",
        "--export",
        "type=nbd,id=e,node-name=d,writable=on",
        name="holder",
    )
    try:
        b = run_blockd("--socket", tmp_path / "b.sock", "--blockdev", _spec(img))
        q = run_qsd("--blockdev", _spec(img), *qsd_monitor_args(tmp_path / "q.sock"))
    finally:
        holder.stop()
    assert b.returncode == q.returncode == 1
    hint = f"Is another process using the image [{img}]?"
    assert lines(q.stderr)[1:] == [hint]
    first, *rest = lines(b.stderr)
    assert rest == [hint]
    # blockd names the lock it misses the way its permission model sees it (QSD: "write").
    assert first.startswith(f"blockd: --blockdev {_spec(img)}: Failed to get "), first
    assert first.endswith(' "write" lock'), first


def test_qmp_is_served_only_after_the_blockdev_nodes_opened(tmp_path: Path) -> None:
    img = qcow2_image(tmp_path / "a.qcow2", 16 * MiB)
    d = start_blockd(tmp_path, "--blockdev", _spec(img))
    try:
        s = Session(d.sock)
        names = [n["node-name"] for n in s.ok("query-named-block-nodes")]
        assert "d" in names
        s.close()
    finally:
        assert d.stop() == 0
    log = d.log_text()
    assert log.index("opened node d (qcow2)") < log.index("QMP listening on")
