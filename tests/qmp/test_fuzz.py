"""Hypothesis fuzzing of raw QMP input: the daemon never dies, every input gets a reply or a
clean close, and every reply is a well-formed CR LF terminated JSON object."""

from __future__ import annotations

import json
import socket
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_commands = st.sampled_from(
    [
        "query-version",
        "query-jobs",
        "blockdev-add",
        "blockdev-del",
        "job-cancel",
        "query-named-block-nodes",
        "nope",
        "qmp_capabilities",
        "blockdev-create",
    ]
)
_messages = st.one_of(
    st.builds(
        lambda c, a, i: json.dumps({"execute": c, "arguments": a, "id": i}),
        _commands,
        st.dictionaries(
            st.sampled_from(
                ["node-name", "driver", "id", "size", "job-id", "options", "flat", "file", "bogus"]
            ),
            _json,
            max_size=4,
        ),
        _json,
    ),
    _json.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.lists(
        st.sampled_from([*list("{}[]:,\"' "), "true", "nul", "1e5", "-0", "\\u12", "\\"]),
        max_size=30,
    ).map("".join),
)


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            raise AssertionError("no reply and no close within the timeout") from None
        if not chunk:
            return out
        out += chunk


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(line=_messages)
def test_raw_input_never_kills_the_daemon(shared_blockd: Any, line: str) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(shared_blockd.sock))
    s.sendall(b'{"execute": "qmp_capabilities"}')
    s.sendall(line.encode("utf-8", "surrogatepass") + b"\n")
    s.shutdown(socket.SHUT_WR)  # end of input: the daemon answers what it can, then closes
    data = _read_all(s)
    s.close()
    assert data.endswith(b"\r\n")
    msgs = data.split(b"\r\n")[:-1]
    assert b'"QMP"' in msgs[0]
    for raw in msgs[1:]:
        msg = json.loads(raw)
        assert isinstance(msg, dict) and ("return" in msg or "error" in msg or "event" in msg)
    assert shared_blockd.proc.poll() is None
