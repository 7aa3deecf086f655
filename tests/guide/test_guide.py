"""docs/guide.md and the README's qmp-shell session, replayed as written: every command typed
into a real qmp-shell or shell against a real blockd, every reply checked against the one the
document shows (the rules are in transcripts.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import ROOT
from transcripts import Replay, Step, matches, sessions

GUIDE = ROOT / "docs" / "guide.md"
README = ROOT / "README.md"

#: What the guide must show being done (issue 8, item 10): a pattern on "PROMPT COMMAND".
COVERED = [
    r"^\$ \./scripts/blockd --socket \S+ --pidfile ",
    r"^\$ \./scripts/blockd .*--blockdev ",
    r"^\$ \.venv/bin/qmp-shell -p ",
    r"^\(QEMU\) blockdev-create job-id=",
    r"^\(QEMU\) query-jobs$",
    r"^\(QEMU\) job-dismiss ",
    r"^\(QEMU\) blockdev-add driver=qcow2 ",
    r"^\(QEMU\) nbd-server-start ",
    r"^\(QEMU\) block-export-add type=nbd .*writable=true",
    r"^\(QEMU\) block-export-add type=nbd .*bitmaps=",
    r"^\(QEMU\) blockdev-snapshot-sync ",
    r"^\(QEMU\) blockdev-snapshot node=",
    r"^\(QEMU\) transaction\($",
    r"^TRANS> block-dirty-bitmap-add .*persistent=true",
    r"^TRANS> blockdev-backup .*sync=full",
    r"^TRANS> blockdev-backup .*sync=none",
    r"^\(QEMU\) blockdev-backup .*sync=incremental bitmap=",
    r"^\(QEMU\) drive-backup .*sync=incremental bitmap=",
    r"^\(QEMU\) blockdev-del node-name=",
    r"^\(QEMU\) block-dirty-bitmap-remove ",
    r"^\(QEMU\) quit$",
    r"^\$ qemu-img (compare|convert|check|info|rebase) ",
    r"^\$ qemu-io ",
    r"^\$ nbdinfo --map=qemu:dirty-bitmap:",
    r"^\$ kill -9 ",
]


def _play(tmp_path: Path, steps: list[Step]) -> None:
    replay = Replay(ROOT, tmp_path)
    try:
        replay.play(steps)
    finally:
        unclean = replay.close()
    assert not unclean, f"daemons that did not stop cleanly: {unclean}"


def test_guide(tmp_path: Path) -> None:
    steps = [s for block in sessions(GUIDE.read_text(), "docs/guide.md") for s in block]
    typed = [f"{s.prompt} {s.command}" for s in steps]
    missing = [p for p in COVERED if not any(re.search(p, t) for t in typed)]
    assert not missing, f"the guide no longer shows: {missing}"
    _play(tmp_path, steps)


def test_readme_session(tmp_path: Path) -> None:
    """The README's daemon command, then its qmp-shell session."""
    text = README.read_text()
    (start,) = [line for line in text.splitlines() if line.startswith("./scripts/blockd ")]
    (session,) = sessions(text, "README.md")
    assert [s.command for s in session if s.prompt == "(QEMU)"][:1] == [
        'blockdev-create job-id=c0 options={"driver":"file","filename":"/tmp/disk.img",'
        '"size":67108864}'
    ]
    _play(tmp_path, [Step("README.md", "$", start, ""), *session])


# -- the replay itself must be able to fail --------------------------------------------------
DOC = """\
Some text.

```text
$ echo hello
hello
(QEMU) query-version
{
    "return": ...
}
(QEMU)
TRANS> )
```

```sh
not a session
```
"""


def test_sessions_are_read_with_their_lines() -> None:
    (block,) = sessions(DOC, "doc.md")
    assert [(s.where, s.prompt, s.command) for s in block] == [
        ("doc.md:4", "$", "echo hello"),
        ("doc.md:6", "(QEMU)", "query-version"),
        ("doc.md:10", "(QEMU)", ""),
        ("doc.md:11", "TRANS>", ")"),
    ]
    assert block[0].expected == "hello"
    assert block[1].expected == '{\n    "return": ...\n}'
    with pytest.raises(ValueError, match=r"doc.md:2: a text block must open with a prompt"):
        sessions("```text\noutput first\n$ true\n```\n", "doc.md")


def test_replies_must_be_the_ones_shown() -> None:
    ok = '{\n    "return": {}\n}\n'
    err = '{\n    "error": {\n        "class": "GenericError",\n        "desc": "No"\n    }\n}\n'
    assert matches(ok, ok) and not matches(ok, err) and not matches(err, ok)
    assert matches('{\n    "error": {\n...\n        "desc": "No"\n...', err)
    assert not matches('...\n        "desc": "Yes"\n...', err)
    assert matches("a  \nb\n\n", "a\nb")  # trailing blanks are invisible in a document


def test_a_wrong_output_fails(tmp_path: Path) -> None:
    replay = Replay(ROOT, tmp_path)
    with pytest.raises(AssertionError, match=r"doc.md:4: \$ echo hello"):
        replay.play(sessions(DOC.replace("\nhello\n", "\nbye\n"), "doc.md")[0])
    with pytest.raises(AssertionError, match="exited 1"):
        replay.play([Step("doc.md:1", "$", "false", "")])
    with pytest.raises(AssertionError, match="exited 1"):  # an ellipsis hides no failure
        replay.play([Step("doc.md:1", "$", "echo read; echo bad; echo read; false", "read\n...")])
    replay.play([Step("doc.md:1", "$", "ls /nonexistent", "ls: cannot access ...")])
    with pytest.raises(AssertionError, match="no qmp-shell is running"):
        replay.play([Step("doc.md:1", "(QEMU)", "query-version", "")])
    assert replay.close() == []
