"""Protocol-level differential test: the same scenarios against qemu-storage-daemon 7.2 and
blockd must give the same error classes and texts (version numbers aside)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from diffsupport import Session, run_both
from rawclient import RawQmp

CREATE_FILE = {"driver": "file", "filename": "$TMP/created.img", "size": 1048576}
CREATE_BAD = {"driver": "file", "filename": "/nonexistent/dir/x.img", "size": 1048576}

# Each step: bytes/dict to send. Replies are compared after dropping events and timestamps.
SCENARIO: list[Any] = [
    {"execute": "query-version", "id": "pre"},  # before negotiation
    {"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}, "id": 1},
    {},  # missing execute
    {"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": 1},
    {"execute": "qmp_capabilities", "id": 2},  # second negotiation
    {"exec-oob": "query-version", "id": 9},  # OOB not enabled
    {"execute": "no-such-command", "id": "c3"},
    {"execute": "query-version", "arguments": {"bogus": 1}, "id": "c4"},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co"}, "id": "c5"},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": 5}, "id": "c6"},
    {"execute": "blockdev-add", "arguments": {"driver": "nope", "node-name": "x"}, "id": "c7"},
    {"execute": "blockdev-add", "arguments": {"node-name": "x"}, "id": "c7b"},
    {"execute": "blockdev-add", "arguments": {"driver": 5, "node-name": "x"}, "id": "c7c"},
    {"execute": "blockdev-del", "id": "c8"},
    {"execute": "blockdev-del", "arguments": {"node-name": "nonexist"}, "id": "c9"},
    [1, 2],
    '"just a string"',
    {"foo": 1},
    {"execute": 5},
    {"execute": "query-version", "arguments": []},
    {"execute": "query-version", "extra": 1, "id": "x1"},
    {"execute": "query-version", "id": 99, "control": 1},
    {"execute": "query-version", "exec-oob": "query-version", "id": "both"},
    "{bad json}",
    "@",
    '{"execute" "query-version"}',
    '{"execute": "query-version",}',
    "]",
    '{"execute": "query-version", "id": tru}',
    '{"execute": "query-version", "id": "\\u00e9\\x"}',
    {"execute": "query-version", "id": {"a": [1, 2.5, None, True]}},
    # Lone surrogates are refused by the parser, quoted as written; pairs and U+0000 pass.
    '{"execute": "query-version", "arguments": {"x": "\\ud800"}}',
    '{"execute": "query-version", "arguments": {"x": "\\uD800"}}',
    '{"execute": "query-version", "arguments": {"x": "ab\\ud800\\u0041"}}',
    '{"execute": "query-version", "arguments": {"x": "\\udc00\\ud800"}}',
    '{"execute": "query-version", "arguments": {"\\ud800": 1}}',
    '{"execute": "query-version", "id": ["\\udfff"]}',
    '{"execute": "query-version", "id": "\\ud800", "x": }',
    "{'execute': 'query-version', 'arguments': {'x': '\\ud800'}}",
    '{"execute": "query-version", "id": "\\ud83d\\ude00"}',
    "{'execute': 'query-version', 'id': 'a\\u0000b'}",
    '{"execute": "query-version", "id": "\\\\ud800 \\\\u00e9"}',
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n", "size": "5"}},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n", "size": 5.0}},
    {
        "execute": "blockdev-add",
        "arguments": {"driver": "null-co", "node-name": "n", "size": 2**64},
    },
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n", "cache": 1}},
    {
        "execute": "blockdev-add",
        "arguments": {"driver": "null-co", "node-name": "n", "cache": {"direct": 1}},
    },
    {
        "execute": "blockdev-add",
        "arguments": {"driver": "null-co", "node-name": "n", "bogus": 1, "size": "x"},
    },
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "1n"}},
    {
        "execute": "blockdev-add",
        "arguments": {"driver": "null-co", "node-name": "n", "detect-zeroes": "x"},
    },
    {
        "execute": "blockdev-add",
        "arguments": {"driver": "null-co", "node-name": "n", "detect-zeroes": "unmap"},
    },
    {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": 5}},
    {
        "execute": "blockdev-add",
        "arguments": {"driver": "raw", "node-name": "r", "file": {"driver": "file"}},
    },
    {
        "execute": "blockdev-add",
        "arguments": {
            "driver": "raw",
            "node-name": "r",
            "file": {"driver": "file", "filename": "/x", "bogus": 1},
        },
    },
    {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r2", "file": "nope"}},
    {
        "execute": "blockdev-add",
        "arguments": {
            "driver": "raw",
            "node-name": "r3",
            "file": {"driver": "file", "filename": "/nonexistent/x.img"},
        },
    },
    {"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f", "filename": "/"}},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n"}, "id": "ok1"},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n"}, "id": "dup"},
    {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "r", "file": "n"}},
    {"execute": "blockdev-del", "arguments": {"node-name": "n"}, "id": "inuse"},
    {"execute": "query-named-block-nodes", "arguments": {"flat": "yes"}},
    {"execute": "job-cancel", "arguments": {"id": 5}},
    {"execute": "job-cancel", "arguments": {"id": "zz"}},
    {"execute": "job-pause", "arguments": {"id": "zz"}},
    {"execute": "job-resume", "arguments": {"id": "zz"}},
    {"execute": "job-complete", "arguments": {"id": "zz"}},
    {"execute": "job-finalize", "arguments": {"id": "zz"}},
    {"execute": "job-dismiss", "arguments": {"id": "zz"}},
    {"execute": "block-job-cancel", "arguments": {"device": "zz"}},
    {"execute": "block-job-pause", "arguments": {"device": "zz"}},
    {"execute": "block-job-resume", "arguments": {"device": "zz"}},
    {"execute": "block-job-complete", "arguments": {"device": "zz"}},
    {"execute": "block-job-set-speed", "arguments": {"device": "zz", "speed": 1}},
    {"execute": "block-job-finalize", "arguments": {"id": "zz"}},
    {"execute": "block-job-dismiss", "arguments": {"id": "zz"}},
    {
        "execute": "blockdev-create",
        "arguments": {"job-id": "c", "options": {"driver": "raw", "size": 5}},
    },
    {"execute": "blockdev-create", "arguments": {"options": {"driver": "file"}}},
    {"execute": "blockdev-create", "arguments": {"job-id": "1c", "options": {"driver": "raw"}}},
    {"execute": "blockdev-create", "arguments": {"job-id": "cj", "options": CREATE_FILE}},
    {"wait-concluded": "cj"},
    {"execute": "blockdev-create", "arguments": {"job-id": "cj", "options": CREATE_FILE}},
    {"execute": "blockdev-create", "arguments": {"job-id": "cbad", "options": CREATE_BAD}},
    {"wait-concluded": "cbad"},
    {"execute": "query-jobs"},
    {"execute": "job-pause", "arguments": {"id": "cj"}},
    {"execute": "job-resume", "arguments": {"id": "cj"}},
    {"execute": "job-cancel", "arguments": {"id": "cj"}},
    {"execute": "job-complete", "arguments": {"id": "cj"}},
    {"execute": "job-finalize", "arguments": {"id": "cj"}},
    {"execute": "block-job-cancel", "arguments": {"device": "cj"}},
    {"execute": "job-dismiss", "arguments": {"id": "cj"}, "id": "dismiss"},
    {"execute": "job-dismiss", "arguments": {"id": "cj"}},
    {"execute": "query-jobs"},
]


def _normalize(msg: dict[str, Any]) -> Any:
    if "error" in msg:
        return {"error": msg["error"], "id": msg.get("id", "<none>")}
    if "return" in msg:
        ret = msg["return"]
        if isinstance(ret, dict) and "qemu" in ret and "package" in ret:
            ret = "<version>"
        return {"return": ret, "id": msg.get("id", "<none>")}
    return msg


def _subst(step: Any, tmp: Path) -> Any:
    if isinstance(step, str):
        return step.replace("$TMP", str(tmp))
    if isinstance(step, dict):
        return {k: _subst(v, tmp) for k, v in step.items()}
    if isinstance(step, list):
        return [_subst(v, tmp) for v in step]
    return step


def _play(sock: Path) -> list[Any]:
    tmp = sock.parent / sock.stem
    tmp.mkdir()
    client = RawQmp(sock)
    out: list[Any] = []
    greeting = client.greeting
    assert set(greeting) == {"QMP"}
    assert set(greeting["QMP"]) == {"version", "capabilities"}
    assert set(greeting["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}
    assert greeting["QMP"]["capabilities"] == ["oob"]
    for step in SCENARIO:
        if isinstance(step, dict) and "wait-concluded" in step:
            job = step["wait-concluded"]
            for _ in range(200):
                jobs = client.cmd("query-jobs")["return"]
                if any(j["id"] == job and j["status"] == "concluded" for j in jobs):
                    break
            continue
        client.send(_subst(step, tmp) if not isinstance(step, list) else str(step))
        out.append((str(step)[:120], _normalize(client.reply())))
    client.close()
    return out


def test_same_errors_as_qsd(blockd_factory: Any, qsd_factory: Any) -> None:
    qsd = qsd_factory()
    blockd = blockd_factory()
    want = _play(qsd.sock)
    got = _play(blockd.sock)
    mismatches = [(w[0], w[1], g[1]) for w, g in zip(want, got, strict=True) if w != g]
    assert not mismatches, "\n".join(f"{s}\n  qsd:    {w}\n  blockd: {g}" for s, w, g in mismatches)
    assert blockd.proc.poll() is None


@pytest.mark.parametrize("which", ["blockd"])
def test_replies_end_with_crlf_and_ids_echo(blockd: Any, which: str) -> None:
    c = RawQmp(blockd.sock)
    c.negotiate()
    for rid in ["s", 5, None, [1, "x"], {"deep": {"er": [True, None]}}]:
        r = c.cmd("query-version", id=rid)
        assert r["id"] == rid
        e = c.cmd("nope", id=rid)
        assert e["id"] == rid and e["error"]["class"] == "CommandNotFound"
    # Back-to-back compact objects without newlines, as qemu.qmp sends them.
    c.send('{"execute":"query-version","id":1}{"execute":"query-jobs","id":2}')
    assert c.reply()["id"] == 1
    assert c.reply()["id"] == 2
    # Single quotes are part of QEMU's dialect.
    c.send("{'execute': 'query-jobs', 'id': 'sq'}")
    assert c.reply() == {"return": [], "id": "sq"}
    c.close()


def test_file_and_raw_image_info_match_qsd(tmp_path: Path) -> None:
    """A file whose size is not a multiple of 512 is a node of whole sectors (the tail
    reads as zeroes), and file and raw nodes report a dirty flag, as in QEMU."""

    def build(d: Path) -> None:
        (d / "odd.bin").write_bytes(b"\x01" * 1000)

    def scenario(s: Session, d: Path) -> Any:
        s.ok("blockdev-add", {"driver": "file", "node-name": "F", "filename": str(d / "odd.bin")})
        s.ok("blockdev-add", {"driver": "raw", "node-name": "R", "file": "F"})
        nodes = s.ok("query-named-block-nodes", {"flat": True})
        return [
            {k: v for k, v in n["image"].items() if k != "filename"} | {"name": n["node-name"]}
            for n in nodes
        ]

    res = run_both(tmp_path, build, scenario)
    assert res["blockd"] == res["qsd"]
    assert res["qsd"][0]["virtual-size"] == 1024
