"""A ``--socket`` path that cannot be used ends the start with one line and exit 1, in
qemu-storage-daemon's words where it has them; only a stale socket is ever replaced (QSD
unlinks a regular file or a symlink at the path too; blockd refuses)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lifesupport import lines, qsd_monitor_args, run_blockd, run_qsd


def _qsd_error(sock: Path) -> str:
    """QSD's message for a bad chardev path, without its program and option prefix, on one
    line (it puts the too-long hint on a line of its own)."""
    res = run_qsd(*qsd_monitor_args(sock))
    assert res.returncode == 1, res
    first, *hints = lines(res.stderr)
    prefix = f"qemu-storage-daemon: --chardev socket,path={sock},server=on,wait=off,id=m: "
    assert first.startswith(prefix), first
    return ": ".join([first.removeprefix(prefix), *hints])


@pytest.mark.parametrize("case", ["too-long", "missing-directory", "directory"])
def test_bad_socket_path_is_one_line_in_qsd_words(tmp_path: Path, case: str) -> None:
    if case == "too-long":
        path = tmp_path / ("x" * 120)
    elif case == "missing-directory":
        path = tmp_path / "missing" / "b.sock"
    else:
        path = tmp_path / "adir"
        path.mkdir()
    res = run_blockd("--socket", path)
    assert res.returncode == 1
    assert lines(res.stderr) == [f"blockd: --socket: {_qsd_error(path)}"]


@pytest.mark.parametrize("case", ["regular-file", "dangling-symlink", "symlink-to-file"])
def test_only_a_socket_is_ever_replaced(tmp_path: Path, case: str) -> None:
    path = tmp_path / "b.sock"
    target = tmp_path / "data"
    if case == "regular-file":
        path.write_text("someone's data\n")
    elif case == "dangling-symlink":
        path.symlink_to(tmp_path / "nowhere")
    else:
        target.write_text("someone's data\n")
        path.symlink_to(target)
    res = run_blockd("--socket", path)
    assert res.returncode == 1
    assert lines(res.stderr) == [
        f"blockd: --socket: {path} exists and is not a socket: not replacing it"
    ]
    if case == "regular-file":
        assert path.read_text() == "someone's data\n"
    else:
        assert path.is_symlink()
    if case == "symlink-to-file":
        assert target.read_text() == "someone's data\n"
