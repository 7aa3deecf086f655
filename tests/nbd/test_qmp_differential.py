"""The NBD/export QMP surface, run side by side on QSD 7.2 and blockd: same replies, same
events in the same places (before or after the reply)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from nbdtest import Qmp, RawNbd, daemon, make_raw


def _norm(obj: Any, tmp: Path) -> Any:
    return json.loads(json.dumps(obj).replace(str(tmp), "$DIR"))


def _setup(q: Qmp, tmp: Path, tag: str) -> None:
    q.run(
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": "src",
            "file": {"driver": "file", "filename": str(tmp / "a.raw")},
        },
    )
    q.run("blockdev-add", {"driver": "null-co", "node-name": "ro", "read-only": True})


def _errors_script(tmp: Path, tag: str) -> list[tuple[str, dict[str, Any] | None]]:
    sock = str(tmp / f"{tag}-nbd.sock")
    return [
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "nonode"}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src"}),
        ("nbd-server-add", {"device": "src"}),
        ("nbd-server-add", {"device": "nonode"}),
        ("nbd-server-remove", {"name": "x"}),
        ("nbd-server-stop", None),
        ("nbd-server-start", {"addr": {"type": "unix", "path": sock}}),
        (
            "nbd-server-start",
            {"addr": {"type": "unix", "data": {"path": sock}}, "max-connections": -1},
        ),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "/nonexist/n.sock"}}}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "x" * 200}}}),
        (
            "nbd-server-start",
            {"addr": {"type": "inet", "data": {"host": "no.such.host.invalid", "port": "1"}}},
        ),
        ("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "foo"}}}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "nonode"}),
        ("block-export-add", {"type": "nbd", "id": "0bad", "node-name": "src"}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "ro", "writable": True}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "name": "x" * 5000}),
        (
            "block-export-add",
            {"type": "nbd", "id": "e0", "node-name": "src", "description": "d" * 4097},
        ),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "bitmaps": ["nob"]}),
        (
            "block-export-add",
            {
                "type": "nbd",
                "id": "e0",
                "node-name": "src",
                "bitmaps": [{"node": "src", "name": "nob"}],
            },
        ),
        (
            "block-export-add",
            {
                "type": "nbd",
                "id": "e0",
                "node-name": "src",
                "bitmaps": [{"node": "nonode", "name": "nob"}],
            },
        ),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "iothread": "t"}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "bogus": 1}),
        ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "name": ""}),
        ("query-block-exports", None),
        ("block-export-del", {"id": "e0"}),
        (
            "block-export-add",
            {
                "type": "nbd",
                "id": "e0",
                "node-name": "src",
                "writable": True,
                "writethrough": True,
                "fixed-iothread": False,
                "allocation-depth": True,
                "description": "desc",
            },
        ),
        ("block-export-add", {"type": "nbd", "id": "e9", "node-name": "src"}),
        ("nbd-server-add", {"device": "ro", "writable": True}),
        ("nbd-server-add", {"device": "src", "name": "e0"}),
        ("nbd-server-add", {"device": "src", "name": "e1", "description": "legacy"}),
        ("query-block-exports", None),
        ("blockdev-del", {"node-name": "src"}),
        ("blockdev-del", {"node-name": "ro"}),
        ("nbd-server-remove", {"name": "e0", "mode": "hard"}),
        ("nbd-server-remove", {"name": "nope"}),
        ("block-export-del", {"id": "e0", "mode": "safe"}),
        ("block-export-del", {"id": "e1", "mode": "bogus"}),
        ("query-block-exports", None),
        ("nbd-server-stop", None),
        ("query-block-exports", None),
        ("nbd-server-stop", None),
        ("block-export-add", {"type": "nbd", "id": "e9", "node-name": "src"}),
        ("blockdev-del", {"node-name": "ro"}),
    ]


def test_commands_and_errors_match_qsd(tmp_path: Path) -> None:
    make_raw(tmp_path / "a.raw", 4 << 20)
    seen: dict[str, list[Any]] = {}
    for kind in ("qsd", "blockd"):
        with daemon(tmp_path, kind) as (_d, q):
            _setup(q, tmp_path, kind)
            out = []
            for cmd, args in _errors_script(tmp_path, kind):
                out.append((cmd, _norm(q.transcript(cmd, args), tmp_path)))
            seen[kind] = json.loads(
                json.dumps(out).replace("qsd-nbd", "X").replace("blockd-nbd", "X")
            )
    for (cmd, want), (_c, got) in zip(seen["qsd"], seen["blockd"], strict=True):
        assert got == want, f"{cmd}: QSD {want} blockd {got}"


def _client(sock: Path, name: str) -> RawNbd:
    c = RawNbd(str(sock))
    reps = c.go(name)
    assert reps[-1][0] == 1, reps
    return c


def _removal_scenario(q: Qmp, tmp: Path, kind: str) -> list[Any]:
    """Safe and hard removal with a client in the transmission phase, nbd-server-stop with
    one, and a client whose GO failed (still negotiating) not counting as a user."""
    sock = tmp / f"{kind}-n.sock"
    log: list[Any] = []

    def t(cmd: str, args: dict[str, Any] | None = None) -> None:
        log.append((cmd, q.transcript(cmd, args)))

    def later() -> None:
        log.append(("later", q.drain_events(0.5)))

    t("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    t("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "name": "x"})
    c1 = _client(sock, "x")
    negotiating = RawNbd(str(sock))
    negotiating.greeting()
    reps = negotiating.option_replies(7, RawNbd.info_payload("nope"))
    log.append(("go-unknown", [(r, b.decode()) for r, b in reps]))
    t("block-export-del", {"id": "e0"})
    t("nbd-server-remove", {"name": "e0"})
    t("query-block-exports")
    t("block-export-del", {"id": "e0", "mode": "hard"})
    later()
    log.append(("client1-eof", c1.sock.recv(100)))
    t("query-block-exports")
    negotiating.option(2)  # ABORT: QSD would hang nbd-server-stop on a negotiating client
    negotiating.option_reply()
    negotiating.close()
    t("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "name": "x"})
    c2 = _client(sock, "x")
    t("nbd-server-remove", {"name": "e0", "mode": "hard"})
    later()
    log.append(("client2-eof", c2.sock.recv(100)))
    t("block-export-add", {"type": "nbd", "id": "e0", "node-name": "src", "name": "x"})
    t("block-export-add", {"type": "nbd", "id": "e1", "node-name": "src", "name": "y"})
    c3 = _client(sock, "x")
    c4 = _client(sock, "y")
    c4.disconnect()
    time.sleep(0.2)
    t("block-export-del", {"id": "e1"})
    t("nbd-server-stop")
    later()
    log.append(("client3-eof", c3.sock.recv(100)))
    t("query-block-exports")
    for c in (c1, c2, c3):
        c.close()
    return log


def test_removal_with_clients_matches_qsd(tmp_path: Path) -> None:
    make_raw(tmp_path / "a.raw", 4 << 20)
    seen = {}
    for kind in ("qsd", "blockd"):
        with daemon(tmp_path, kind) as (_d, q):
            _setup(q, tmp_path, kind)
            seen[kind] = _removal_scenario(q, tmp_path, kind)
    for want, got in zip(seen["qsd"], seen["blockd"], strict=True):
        assert got == want, f"QSD {want}\nblockd {got}"
    # The shape QSD shows, spelled out: safe refused, hard replies first, event after.
    log = seen["blockd"]
    dels = [msgs for cmd, msgs in log if cmd == "block-export-del"]
    assert dels[0] == [{"error": {"class": "GenericError", "desc": "export 'e0' still in use"}}]
    assert dels[1] == [{"return": {}}]  # hard: reply first ...
    later = [msgs for cmd, msgs in log if cmd == "later"]
    assert later[0] == [{"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}}]  # ... event after
    stop = next(msgs for cmd, msgs in log if cmd == "nbd-server-stop")
    assert [m.get("event") for m in stop] == ["BLOCK_EXPORT_DELETED", None]


def test_export_name_defaults_and_info(tmp_path: Path) -> None:
    """Export name defaults to node-name, not id; LIST/INFO show name and description."""
    make_raw(tmp_path / "a.raw", 4 << 20)
    out = {}
    for kind in ("qsd", "blockd"):
        with daemon(tmp_path, kind) as (_d, q):
            _setup(q, tmp_path, kind)
            sock = tmp_path / f"{kind}-n.sock"
            q.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
            q.run(
                "block-export-add",
                {
                    "type": "nbd",
                    "id": "exp0",
                    "node-name": "src",
                    "description": "the source",
                    "allocation-depth": True,
                },
            )
            q.run("nbd-server-add", {"device": "ro", "name": "legacy"})
            c = RawNbd(str(sock))
            c.greeting()
            res = {
                "list": c.option_replies(3),
                "info": c.option_replies(6, RawNbd.info_payload("src", (0, 1, 2, 3))),
                "info-id": c.option_replies(6, RawNbd.info_payload("exp0")),
                "list-meta-all": c.option_replies(9, RawNbd.meta_payload("src", [])),
                "list-meta-qemu": c.option_replies(9, RawNbd.meta_payload("src", ["qemu:"])),
                "set-meta-nostruct": c.option_replies(
                    10, RawNbd.meta_payload("src", ["base:allocation"])
                ),
                "structured": c.option_replies(8),
                "structured-again": c.option_replies(8),
                "set-meta": c.option_replies(
                    10,
                    RawNbd.meta_payload(
                        "src", ["base:allocation", "qemu:", "nope:x", "qemu:allocation-depth"]
                    ),
                ),
                "unknown-opt": c.option_replies(99),
                "starttls": c.option_replies(5),
                "list-payload": c.option_replies(3, b"x"),
                "go-legacy": c.option_replies(7, RawNbd.info_payload("legacy", (3,))),
            }
            c.close()
            # Error replies carry free-form text: compare codes only.
            out[kind] = {
                k: [(t, b if not t & (1 << 31) else b"") for t, b in v] for k, v in res.items()
            }
    for k in out["qsd"]:
        # (blockd adds CAN_MULTI_CONN to writable exports only; these are read-only.)
        assert out["blockd"][k] == out["qsd"][k], (k, out["qsd"][k], out["blockd"][k])


def test_bitmap_export_errors_match_qsd(tmp_path: Path) -> None:
    """Bitmap lookups, the read-only/enabled rule checked before busy, busy marking."""
    make_raw(tmp_path / "a.raw", 4 << 20)
    seen: dict[str, list[Any]] = {}
    for kind in ("qsd", "blockd"):
        with daemon(tmp_path, kind) as (_d, q):
            _setup(q, tmp_path, kind)
            sock = str(tmp_path / f"{kind}-b.sock")
            script: list[tuple[str, dict[str, Any] | None]] = [
                ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}),
                ("block-dirty-bitmap-add", {"node": "src", "name": "b0"}),
                (
                    "block-export-add",
                    {
                        "type": "nbd",
                        "id": "e5",
                        "node-name": "src",
                        "name": "x5",
                        "bitmaps": ["b0"],
                    },
                ),
                (
                    "block-export-add",
                    {
                        "type": "nbd",
                        "id": "e5",
                        "node-name": "src",
                        "name": "x5",
                        "bitmaps": ["b0"],
                        "writable": True,
                    },
                ),
                (
                    "block-export-add",
                    {
                        "type": "nbd",
                        "id": "e6",
                        "node-name": "src",
                        "name": "x6",
                        "bitmaps": ["b0"],
                        "writable": True,
                    },
                ),
                (
                    "block-export-add",
                    {
                        "type": "nbd",
                        "id": "e6",
                        "node-name": "src",
                        "name": "x6",
                        "bitmaps": [{"node": "src", "name": "b0"}],
                        "writable": True,
                    },
                ),
                ("block-dirty-bitmap-disable", {"node": "src", "name": "b0"}),
                ("block-dirty-bitmap-remove", {"node": "src", "name": "b0"}),
                ("nbd-server-add", {"device": "src", "name": "x7", "bitmap": "b0"}),
                ("block-export-del", {"id": "e5"}),
                ("block-dirty-bitmap-add", {"node": "src", "name": "b1", "disabled": True}),
                ("nbd-server-add", {"device": "src", "name": "x7", "bitmap": "b1"}),
                (
                    "block-export-add",
                    {
                        "type": "nbd",
                        "id": "e8",
                        "node-name": "src",
                        "name": "x8",
                        "bitmaps": ["b0", "b0"],
                    },
                ),
                ("query-named-block-nodes", {"flat": True}),
                ("nbd-server-stop", None),
                ("block-dirty-bitmap-remove", {"node": "src", "name": "b1"}),
            ]
            out = []
            for cmd, args in script:
                res = q.transcript(cmd, args)
                if cmd == "query-named-block-nodes":
                    res = [n.get("dirty-bitmaps") for n in res[-1]["return"]]
                out.append((cmd, res))
            seen[kind] = out
    for (cmd, want), (_c, got) in zip(seen["qsd"], seen["blockd"], strict=True):
        assert got == want, f"{cmd}: QSD {want} blockd {got}"
