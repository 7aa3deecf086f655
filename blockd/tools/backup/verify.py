"""``verify``: every layer a point needs is checked by ``qemu-img check``, names the backing
file it should, and still holds the chunks its ``.sums`` file recorded when it was written;
and the chain's sums still add up to the digest the manifest recorded for the point.

Nothing but the backup directory is read: not the live disk, not the daemon. A flipped byte
in any layer's data changes that chunk's hash; one in a layer's metadata is caught by
``qemu-img check`` or changes which chunks the layer holds; one in a sums file or a manifest
no longer adds up. Each layer is checked once, however many points share it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

from blockd.tools.backup import digest, lock
from blockd.tools.backup.errors import EXIT_FAILED, EXIT_OK, EXIT_VERIFY, ToolError
from blockd.tools.backup.layers import LayerError, hash_chunks, read_map
from blockd.tools.backup.manifest import BackupDir, Chain, Point
from blockd.tools.backup.progress import Reporter
from blockd.tools.backup.qemuimg import qemu_img

SHOW = 3  # differing chunks named per layer
PARALLEL = 4  # layers checked at once


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layers: dict[Path, bool] = field(default_factory=dict)  # checked layer -> good


async def check_layer(
    chain: Chain, layer: str, sums_file: str, backing: str | None, f: Findings
) -> None:
    path = chain.path / layer
    bad_before = len(f.problems)
    rc, out, err = await qemu_img("check", "--output=json", "-f", "qcow2", path, check=False)
    if rc == 3:
        leaks = json.loads(out).get("leaks", "?") if out.strip() else "?"
        f.notes.append(f"{path}: {leaks} leaked cluster(s) (harmless; space only)")
    elif rc != 0:
        detail = (err or out).strip().splitlines()
        f.problems.append(f"{path}: qemu-img check: {detail[-1] if detail else f'exit {rc}'}")
    try:
        lm = await asyncio.to_thread(read_map, path)
        if lm.backing != backing:
            f.problems.append(f"{path}: backing file is {lm.backing!r}, should be {backing!r}")
        want = await asyncio.to_thread(digest.read_sums, chain.path / sums_file)
        got = digest.Sums.from_chunks(lm, await asyncio.to_thread(hash_chunks, lm))
        diff = digest.differences(want, got)
        if diff:
            where = ", ".join(f"offset {i * lm.cluster_size:#x}" for i in diff[:SHOW])
            more = f" and {len(diff) - SHOW} more" if len(diff) > SHOW else ""
            f.problems.append(
                f"{path}: {len(diff)} chunk(s) differ from {sums_file}: {where}{more}"
            )
    except (LayerError, ToolError) as exc:
        f.problems.append(str(exc))
    f.layers[path] = len(f.problems) == bad_before


def layers_of(chain: Chain, point: Point) -> list[tuple[str, str, str | None]]:
    """(layer, its sums file, the backing file it must name) for every layer of *point*."""
    out = []
    for disk in point.disks:
        backing: str | None = None
        for q in chain.points_up_to(point.point):
            layer = q.disks[disk]
            out.append((layer.layer, layer.sums, backing))
            backing = layer.layer
    return out


async def check_points(targets: list[tuple[Chain, Point]], f: Findings) -> list[int]:
    """Check every layer the *targets* need (each once, a few at a time: qemu-img check and
    hashing overlap), then each point's digest; the points that failed."""
    todo: dict[Path, tuple[Chain, str, str, str | None]] = {}
    for chain, point in targets:
        for layer, sums_file, backing in layers_of(chain, point):
            todo.setdefault(chain.path / layer, (chain, layer, sums_file, backing))
    gate = asyncio.Semaphore(PARALLEL)

    async def one(args: tuple[Chain, str, str, str | None]) -> None:
        async with gate:
            await check_layer(*args, f)

    await asyncio.gather(*(one(a) for a in todo.values()))
    bad = []
    for chain, point in targets:
        good = all(f.layers[chain.path / layer] for layer, _, _ in layers_of(chain, point))
        for disk, dp in point.disks.items():
            try:
                files = chain.sums_up_to(point.point, disk)
                sums = [digest.read_sums(chain.path / name) for name in files]
                if digest.point_digest(sums) != dp.digest:
                    f.problems.append(
                        f"point {point.point}, {disk}: digest differs from the manifest"
                    )
                    good = False
            except ToolError as exc:
                f.problems.append(str(exc))
                good = False
        if not good:
            bad.append(point.point)
    return bad


async def verify(directory: Path, number: int | None, rep: Reporter) -> int:
    bdir = BackupDir.open(directory)
    with lock.readers(bdir.path):
        chains = bdir.chains()
        for c in chains:
            if c.journal is not None:
                raise ToolError(
                    f"a prune of {c.path.name} was interrupted; run 'blockd-backup prune "
                    f"{directory}' to finish it, then verify",
                    EXIT_FAILED,
                )
        if number is not None:
            targets = [bdir.find_point(number)]
        else:
            targets = [(c, p) for c in chains for p in c.points]
            if not targets:
                raise ToolError(f"{directory} holds no backup point yet")
        f = Findings()
        bad = await check_points(targets, f)
        for note in f.notes:
            rep.note(note)
        for problem in f.problems:
            rep.note(problem)
        n = len(targets)
        layers = len(f.layers)
        if bad:
            rep.result(
                f"verify FAILED: point(s) {', '.join(map(str, bad))} of {n} checked "
                f"({layers} layers) do not match",
                ok=False,
                bad=bad,
                problems=f.problems,
            )
            return EXIT_VERIFY
        rep.result(f"verify ok: {n} point(s), {layers} layer(s)", ok=True, points=n)
        return EXIT_OK
