"""How ``prune`` merges layers: the one place that knows which engine does the copying.

Today the merge is ``qemu-img commit -b BASE TOP``: it copies every cluster that the layers
above BASE (up to TOP) hold into BASE, and leaves TOP and the layers between untouched. That
is what makes an interrupted merge harmless for the kept points: TOP still reads the same
through its chain at every moment (a cluster is taken from the layers above BASE when they
hold it, and BASE only changes where they do), and running the merge again writes the same
data again.

When blockd's ``block-commit`` job lands, a ``DaemonCommit`` merger can replace
:class:`QemuImgCommit` here without touching prune.py, under the same contract: open the
chain's newest layer in the daemon (its backing files come with it), ``block-commit`` with
``top-node`` = *top* and ``base-node`` = *base* (an intermediate commit, which completes by
itself; when *top* is the open layer itself it is an active commit, which needs
``job-complete`` at READY), follow the job by polling ``query-jobs`` as a backup run does,
then ``blockdev-del``. ``rebase`` stays a header edit (``qemu-img rebase -u``) on a closed
file. The daemon could then merge while it keeps serving other points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from blockd.tools.backup.qemuimg import qemu_img


class Merger(Protocol):
    async def commit(self, top: Path, base: Path) -> None:
        """Make *base* hold what *top* reads through its chain, changing *base* only where a
        layer above it holds data; *top* and the layers between stay as they are."""

    async def rebase(self, layer: Path, backing: str) -> None:
        """Point *layer* at *backing* (a name relative to its directory), data unchanged:
        only valid when *backing* already reads the same as the old backing file."""


class QemuImgCommit:
    async def commit(self, top: Path, base: Path) -> None:
        await qemu_img("commit", "-q", "-f", "qcow2", "-b", base, top)

    async def rebase(self, layer: Path, backing: str) -> None:
        await qemu_img("rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing, layer)


def default_merger() -> Merger:
    return QemuImgCommit()
