"""Crash consistency: a child process writes through blockd and is killed with SIGKILL at a
random moment. Afterwards ``qemu-img check`` must find no corruption (leaks are allowed) and
every byte the child had flushed must read back, except where a later, unflushed request may
have changed it."""

from __future__ import annotations

import asyncio
import random
import shutil
import sys
from pathlib import Path

from qcow2_helpers import MiB, Op, Shadow, check_image, pattern, qemu_img, to_raw

CHILD = str(Path(__file__).resolve().parent / "qcow2_crash_child.py")
SIZE = 8 * MiB
RUNS = 20
CONFIGS = [
    # (compat, cluster size, refcount bits, backing)
    ("1.1", 65536, 16, False),
    ("1.1", 512, 16, True),
    ("0.10", 4096, 16, False),
    ("0.10", 65536, 16, True),
    ("1.1", 4096, 64, False),
    ("1.1", 512, 1, False),
]


async def one_run(tmp: Path, run: int) -> tuple[int, int]:
    compat, cluster, bits, backing = CONFIGS[run % len(CONFIGS)]
    rng = random.Random(1000 + run)
    d = tmp / f"run{run}"
    d.mkdir()
    img = str(d / "img.qcow2")
    initial = bytes(SIZE)
    args = ["create", "-f", "qcow2", "-o", f"compat={compat},cluster_size={cluster}"]
    if compat == "1.1":
        args[-1] += f",refcount_bits={bits}"
    if backing:
        base = d / "base.raw"
        initial = pattern(run, SIZE)
        base.write_bytes(initial)
        args += ["-b", str(base), "-F", "raw"]
    qemu_img(*args, img, str(SIZE))
    seed = 50 + run
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        CHILD,
        img,
        str(seed),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert first.strip() == b"READY", first + (await proc.stderr.read() if proc.stderr else b"")
    await asyncio.sleep(rng.uniform(0.05, 0.9))
    proc.kill()
    out, err = await proc.communicate()
    assert proc.returncode == -9, err.decode()

    batches: list[list[Op]] = []
    durable = -1
    for line in out.decode().splitlines():
        if line.startswith("B "):
            batches.append([Op.parse(t) for t in line[2:].split(";")])
        elif line.startswith("F "):
            durable = int(line[2:])
    res = check_image(img)
    assert res.get("corruptions", 0) == 0 and res.get("check-errors", 0) == 0, (run, res)
    assert res["rc"] in (0, 3), (run, res)

    pat = pattern(seed)
    shadow = Shadow(initial, cluster, 3 if compat == "1.1" else 2, backing)
    uncertain = bytearray(SIZE)
    for i, batch in enumerate(batches):
        for op in batch:
            if i <= durable:
                shadow.apply(op, pat)
            else:
                uncertain[op.offset : op.offset + op.length] = b"\x01" * op.length
    got = to_raw(img, str(d / "out.raw"))
    assert len(got) == SIZE
    bad = [
        i
        for i in range(0, SIZE, 512)
        if got[i : i + 512] != shadow.data[i : i + 512]
        and any(not uncertain[j] and got[j] != shadow.data[j] for j in range(i, min(i + 512, SIZE)))
    ]
    assert not bad, f"run {run}: flushed data lost at {bad[:5]} (durable batch {durable})"
    shutil.rmtree(d)  # disk is scarce on CI machines; a failed run keeps its files
    return durable, len(batches)


async def test_kill_9_leaves_consistent_image(tmp_path):
    sem = asyncio.Semaphore(2)

    async def guarded(run: int) -> tuple[int, int]:
        async with sem:
            return await one_run(tmp_path, run)

    results = await asyncio.gather(*(guarded(r) for r in range(RUNS)))
    print("durable/issued batches per run:", results)
    # The kills must land mid-workload, after flushes, for the check to mean something.
    assert sum(1 for durable, issued in results if 0 <= durable < issued - 1) >= RUNS // 2
