"""``prune --keep N``: keep the newest N points, merge the oldest kept incremental into its
chain's base, and delete whole chains that hold no kept point.

Crash safety rests on a journal in the chain's manifest and on the merge's contract
(merge.py). The steps, each finished before the next starts:

1. write the merged ``.sums`` of the new base (a new file name);
2. manifest: the dropped points are gone, journal ``{phase: merge}`` says what is merged;
3. merge the layers up to the oldest kept point into the base file (qemu-img commit);
4. re-verify: the base file now hashes to the merged sums, chunk by chunk;
5. rebase the next layer (if any) onto the base file (header only);
6. manifest: the oldest kept point now lives in the base file, journal ``{phase: delete}``;
7. delete the merged layers and the old sums; manifest without journal.

Before step 6 every kept point reads through its own, untouched layer file, and after it
through the base, which by then holds exactly that point; so at no moment is a kept point
unreadable. A prune that was interrupted is taken up again from its journal by the next
``prune``; each step can run twice. Whole chains are deleted by renaming their directory
first (``.deleting-chain-NNNN``), so a half-deleted chain is never mistaken for a chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import Any

from blockd.tools.backup import digest, lock
from blockd.tools.backup.backup import recover
from blockd.tools.backup.errors import ToolError
from blockd.tools.backup.layers import hash_chunks, read_map
from blockd.tools.backup.manifest import BackupDir, Chain, fsync_dir
from blockd.tools.backup.merge import Merger, default_merger
from blockd.tools.backup.progress import Reporter
from blockd.tools.backup.testhooks import crash_point

DELETING = ".deleting-"


def merged_sums_name(disk: str, base_point: int, into: int) -> str:
    return f"{disk}.{base_point:04d}-{into:04d}.sums"


async def prune(
    directory: Path, keep: int, rep: Reporter, merger: Merger | None = None
) -> dict[str, Any]:
    if keep < 1:
        raise ToolError("--keep must be at least 1")
    merger = merger or default_merger()
    bdir = BackupDir.open(directory)
    with lock.writer(bdir.path), lock.readers(bdir.path, exclusive=True):
        recover(bdir, rep)
        await finish_interrupted(bdir, rep, merger)
        chains = bdir.chains()
        every = [(c, p.point) for c in chains for p in c.points]
        if len(every) <= keep:
            rep.result(f"nothing to prune: {len(every)} point(s), keeping {keep}", dropped=[])
            return {"dropped": []}
        cut = every[-keep][1]  # oldest kept point
        dropped = [n for _, n in every[:-keep]]
        for chain in chains:
            if all(p.point < cut for p in chain.points):
                delete_chain(chain)
            elif chain.points[0].point < cut:
                await merge_front(chain, cut, merger, rep)
        remove_leftovers(bdir)
        rep.result(
            f"pruned point(s) {', '.join(map(str, dropped))}; kept {keep} from point {cut}",
            dropped=dropped,
            oldest=cut,
        )
        return {"dropped": dropped, "oldest": cut}


def delete_chain(chain: Chain) -> None:
    gone = chain.path.with_name(DELETING + chain.path.name)
    chain.path.rename(gone)
    fsync_dir(gone.parent)
    shutil.rmtree(gone)


def remove_leftovers(bdir: BackupDir) -> None:
    for sub in bdir.path.glob(DELETING + "*"):
        shutil.rmtree(sub, ignore_errors=True)


async def merge_front(chain: Chain, cut: int, merger: Merger, rep: Reporter) -> None:
    """Drop the points of *chain* before *cut*; point *cut* becomes the chain's base."""
    base_point = chain.points[0]
    into = chain.point(cut)
    assert into is not None
    drop = [p.point for p in chain.points if p.point < cut]
    merged: dict[str, str] = {}
    for disk in chain.disks:
        files = chain.sums_up_to(cut, disk)
        sums = [digest.read_sums(chain.path / name) for name in files]
        name = merged_sums_name(disk, base_point.point, cut)
        digest.write_sums(chain.path / name, digest.merge(sums))
        merged[disk] = name
    crash_point("prune-sums-written")
    chain.journal = {
        "op": "merge",
        "phase": "merge",
        "into": cut,
        "dropped": drop,
        "base": {disk: base_point.disks[disk].layer for disk in chain.disks},
        "merged-sums": merged,
        "remove": sorted(
            {
                f
                for p in chain.points
                if p.point <= cut
                for d in chain.disks
                for f in (p.disks[d].layer, p.disks[d].sums)
            }
            - {base_point.disks[d].layer for d in chain.disks}
        ),
    }
    chain.points = [p for p in chain.points if p.point >= cut]
    chain.save()
    crash_point("prune-journal-written")
    rep.note(f"merging point(s) {', '.join(map(str, drop))} of {chain.path.name} into point {cut}")
    await run_journal(chain, merger)


async def run_journal(chain: Chain, merger: Merger) -> None:
    j = chain.journal
    assert j is not None
    into = chain.point(j["into"])
    if into is None:
        raise ToolError(f"{chain.manifest}: journal names point {j['into']}, which is gone")
    if j["phase"] == "merge":
        for disk in chain.disks:
            base = chain.path / j["base"][disk]
            top = chain.path / into.disks[disk].layer
            if top != base:
                await merger.commit(top, base)
            crash_point("prune-committed")
            lm = await asyncio.to_thread(read_map, base)
            got = digest.Sums.from_chunks(lm, await asyncio.to_thread(hash_chunks, lm))
            want = digest.read_sums(chain.path / j["merged-sums"][disk])
            diff = digest.differences(want, got)
            if diff:
                raise ToolError(
                    f"after merging into {base}, {len(diff)} chunk(s) differ from the sums; "
                    "the kept points are still readable through their own layers"
                )
            nxt = _after(chain, j["into"])
            if nxt is not None:
                await merger.rebase(chain.path / nxt.disks[disk].layer, base.name)
        crash_point("prune-rebased")
        for disk in chain.disks:
            dp = into.disks[disk]
            dp.layer = j["base"][disk]
            dp.sums = j["merged-sums"][disk]
            dp.stored = (chain.path / dp.layer).stat().st_size
        into.merged = sorted(set(into.merged) | set(j["dropped"]))
        into.level = "full"
        j["phase"] = "delete"
        chain.save()
        crash_point("prune-switched")
    if j["phase"] == "delete":
        for name in j["remove"]:
            with contextlib.suppress(FileNotFoundError):
                (chain.path / name).unlink()
        fsync_dir(chain.path)
        chain.journal = None
        chain.save()
        await reverify_digests(chain)


def _after(chain: Chain, number: int) -> Any:
    later = [p for p in chain.points if p.point > number]
    return later[0] if later else None


async def reverify_digests(chain: Chain) -> None:
    """Every kept point's sums still add up to the digest it was taken with."""
    for p in chain.points:
        for disk, dp in p.disks.items():
            files = chain.sums_up_to(p.point, disk)
            sums = [digest.read_sums(chain.path / name) for name in files]
            if digest.point_digest(sums) != dp.digest:
                raise ToolError(f"after the prune, point {p.point} of {disk} no longer adds up")


async def finish_interrupted(bdir: BackupDir, rep: Reporter, merger: Merger | None = None) -> None:
    for chain in bdir.chains():
        if chain.journal is not None:
            rep.note(f"finishing the prune of {chain.path.name} that was interrupted")
            await run_journal(chain, merger or default_merger())
    remove_leftovers(bdir)
