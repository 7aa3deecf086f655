"""Hostile vmdk and seSparse images: 330 seeded mutations of small images of every layout
(monolithicSparse, streamOptimized, monolithicFlat, twoGbMaxExtentSparse, a delta, seSparse
with and without a parent, vmfsSparse) are handed to ONE running blockd and to
qemu-storage-daemon.

For every case: blockdev-add answers within REPLY_TIMEOUT, a refusal is a GenericError with a
readable text; whatever QSD refuses, blockd refuses too; an image that opens is exported and
read (plain reads and block status queries) with every request answered; where both daemons
return data for a read-only open it is the same data. Afterwards the daemon still answers,
its log has no traceback and its peak memory stayed small.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from imagegen import (
    CONST_FIELDS,
    VMDK4_FIELDS,
    SeSparse,
    build_sesparse,
    build_vmdk3,
    get_field,
    grain_entry,
    random_grains,
    set_field,
)
from nbdtest import RawNbd
from support import qemu_img, qemu_io
from vmdktest import SIDES, MiB, Pair, cid_of, descriptor_of, vmdk_node

from blockd.nbd import protocol as P

CASES = 330
REPLY_TIMEOUT = 5.0
READ_CAP = MiB // 2
CHUNK = 256 * 1024
SEED = int(os.environ.get("BLOCKD_VMDK_FUZZ_SEED", "20240611"))
TOP64 = 2**64 - 1


@dataclass
class Base:
    name: str
    main: str
    files: dict[str, bytes]
    kinds: list[str] = field(default_factory=list)


def _bases(d: Path) -> list[Base]:
    rng = random.Random(1)
    src = d / "src.bin"
    src.write_bytes(rng.randbytes(MiB))
    out: list[Base] = []

    cids: dict[bytes, bytes] = {}

    def fixed(m: re.Match[bytes]) -> bytes:
        # qemu-img's CIDs are random: fixed ones keep every case of a seed the same.
        new = cids.setdefault(m.group(2), b"%08x" % (0x10203040 + 0x1111 * len(cids)))
        return m.group(1) + new

    def grab(name: str, main: str, kinds: list[str], *extra: str) -> None:
        files = {}
        for n in (main, *extra):
            data = (d / n).read_bytes()
            if data[:4] == b"KDMV":  # the embedded descriptor keeps its 20 sectors
                text = re.sub(rb"(CID=)([0-9a-f]+)", fixed, data[512:10752])[:10240]
                files[n] = data[:512] + text.ljust(10240, b"\0") + data[10752:]
            else:
                files[n] = re.sub(rb"(CID=)([0-9a-f]+)", fixed, data)
        out.append(Base(name, main, files, kinds))

    qemu_img("create", "-q", "-f", "vmdk", d / "s.vmdk", "3M")
    qemu_io("-f", "vmdk", "-c", f"write -s {src} 0 300k", "-c", "write -P 9 2M 70k", d / "s.vmdk")
    grab("sparse", "s.vmdk", ["v4", "v4", "gd", "gt", "gt", "desc", "trunc", "bytes"])
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", d / "z.vmdk", "2M")
    qemu_io("-f", "vmdk", "-c", "write -P 3 0 200k", "-c", "write -z 512k 512k", d / "z.vmdk")
    grab("zeroed", "z.vmdk", ["v4", "gt", "gt", "desc"])
    raw = d / "r.raw"
    raw.write_bytes(src.read_bytes()[: 700 * 1024] + bytes(MiB) + b"x" * 300000)
    so = d / "so.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, so)
    grab("stream", "so.vmdk", ["v4", "gt", "marker", "marker", "trunc", "desc"])
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", d / "f.vmdk", "2M")
    qemu_io("-f", "vmdk", "-c", "write -P 5 100k 1M", d / "f.vmdk")
    grab("flat", "f.vmdk", ["desc", "desc", "desc"], "f-flat.vmdk")
    split = d / "t.vmdk"
    qemu_img(
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        split,
        str(2 * 1024 * MiB + MiB),
    )
    qemu_io("-f", "vmdk", "-c", "write -P 6 0 64k", "-c", f"write -P 7 {2048 * MiB} 128k", split)
    grab("split", "t.vmdk", ["desc", "desc", "v4", "gt"], "t-s001.vmdk", "t-s002.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", d / "base.vmdk", "2M")
    qemu_io("-f", "vmdk", "-c", "write -P 1 0 2M", d / "base.vmdk")
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", d / "top.vmdk")
    qemu_io("-f", "vmdk", "-c", "write -P 2 64k 64k", d / "top.vmdk")
    grab("delta", "top.vmdk", ["desc", "desc", "gt"], "base.vmdk")
    cap = 20 * MiB
    build_sesparse(d, "se", SeSparse(cap, random_grains(rng, cap, 60), seed=3))
    grab("sesparse", "se.vmdk", ["se"] * 6 + ["segd", "segt", "segt", "desc"], "se-sesparse.vmdk")
    pcid = cid_of(descriptor_of(d / "base.vmdk"))
    spec = SeSparse(
        2 * MiB, random_grains(rng, 2 * MiB, 40), parent=d / "base.vmdk", parent_cid=pcid, seed=4
    )
    build_sesparse(d, "sp", spec)
    grab("se-parent", "sp.vmdk", ["se", "segt", "desc"], "sp-sesparse.vmdk", "base.vmdk")
    grains = {g: rng.randbytes(4096) for g in rng.sample(range(512), 30)}
    build_vmdk3(d, "c", 2 * MiB, grains)
    grab("cowd", "c.vmdk", ["v3", "v3", "gt3", "desc"], "c-cowd.vmdk")
    return out


# -- mutations -----------------------------------------------------------------------------------
def _u(data: bytes | bytearray, pos: int, width: int) -> int:
    return int.from_bytes(data[pos : pos + width], "little")


def _put(data: bytearray, pos: int, width: int, value: int) -> None:
    if pos + width <= len(data):
        data[pos : pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


def _value(rng: random.Random, old: int, width: int, flen: int) -> int:
    top = (1 << (8 * width)) - 1
    past = (flen // 512) + rng.randint(1, 1 << rng.randrange(1, 30))
    return (
        rng.choice(
            [
                0,
                1,
                top,
                top >> 1,
                old + 1,
                old - 1,
                old * 2,
                old ^ (1 << rng.randrange(8 * width)),
                rng.getrandbits(8 * width),
                past,
                1 << rng.randrange(8 * width),
                old * 512,
            ]
        )
        & top
    )


V4_SPECIAL = {
    "version": [0, 1, 2, 3, 4, 0xFFFFFFFF],
    "flags": [0, 1, 2, 4, 0x30000, 0x20003, 0xFFFFFFFF],
    "capacity": [0, 1, (1 << 25) * 65536, (1 << 25) * 65536 + 1, 1 << 62, TOP64],
    "granularity": [0, 1, 8, 127, 0x200000, 0x200001, 1 << 32],
    "num_gtes_per_gt": [0, 1, 511, 512, 513, 4096],
    "compress_algorithm": [0, 1, 2],
    "desc_offset": [0, 1, 2, 1 << 40],
    "gd_offset": [0, 1, TOP64, 1 << 55],
}


def _table_positions(data: bytes, which: str) -> list[int]:
    """Byte positions of grain directory or grain table entries of a VMDK4 file."""
    if data[:4] != b"KDMV" or len(data) < 80:
        return []
    gtes = get_field(data, "num_gtes_per_gt") or 1
    gran = get_field(data, "granularity") or 1
    cap = get_field(data, "capacity")
    l1 = min(-(-cap // (gtes * gran)), 4096)
    gd = get_field(data, "rgd_offset" if which == "rgd" else "gd_offset") * 512
    dir_pos = [gd + 4 * i for i in range(l1) if gd + 4 * i + 4 <= len(data)]
    if which != "gt":
        return dir_pos
    out = []
    for p in dir_pos:
        t = _u(data, p, 4) * 512
        out += [
            t + 4 * i for i in range(gtes) if t + 4 * i + 4 <= len(data) and _u(data, t + 4 * i, 4)
        ]
    return out or dir_pos


def _mutate_desc(rng: random.Random, text: bytearray) -> tuple[bytearray, str]:
    lines = text.split(b"\n")
    what = rng.choice(
        [
            "number",
            "number",
            "line",
            "dup",
            "ctype",
            "type",
            "byte",
            "quote",
            "access",
            "cid",
            "hint",
        ]
    )
    nums = list(re.finditer(rb"-?\d+", text))
    if what == "number" and nums:
        m = rng.choice(nums)
        new = str(
            rng.choice(
                [0, -1, 1, 2**31, 2**63 - 1, 2**64, int(m.group()) + 1, int(m.group()) * 1024]
            )
        ).encode()
        return bytearray(text[: m.start()] + new + text[m.end() :]), "desc:number"
    if what in ("line", "dup") and len(lines) > 2:
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i]) if what == "dup" else lines.pop(i)
        return bytearray(b"\n".join(lines)), f"desc:{what}"
    if what == "ctype":
        ct = rng.choice(
            [
                b"monolithicFlat",
                b"vmfs",
                b"seSparse",
                b"twoGbMaxExtentFlat",
                b"streamOptimized",
                b"x" * 200,
                b"",
            ]
        )
        return bytearray(re.sub(rb'createType="[^"]*"', b'createType="' + ct + b'"', text)), what
    if what == "type":
        t = rng.choice(
            [b"FLAT", b"SPARSE", b"VMFS", b"VMFSSPARSE", b"SESPARSE", b"ZERO", b"VMFSRDM"]
        )
        return bytearray(re.sub(rb"(RW \d+ )[A-Z]+", rb"\g<1>" + t, text, count=1)), "desc:type"
    if what == "access":
        return bytearray(
            text.replace(b"RW ", rng.choice([b"RDONLY ", b"NOACCESS ", b"RW  "]), 1)
        ), what
    if what == "cid":
        key = rng.choice([rb"CID=[0-9a-f]+", rb"parentCID=[0-9a-f]+"])
        val = rng.choice([b"CID=", b"CID=zz", b"CID=0x1", b"CID=-5", b"CID=fffffffff1"])
        return bytearray(re.sub(key, val, text, count=1)), "desc:cid"
    if what == "hint":
        hint = rng.choice(
            [
                b'parentFileNameHint="nowhere.vmdk"\n',
                b'parentFileNameHint="x',
                b'parentFileNameHint=""\n',
                b'parentFileNameHint="f-flat.vmdk"\n',
            ]
        )
        return bytearray(text + hint), "desc:hint"
    if what == "quote":
        q = [i for i, c in enumerate(text) if c == 0x22]
        if q:
            del text[rng.choice(q)]
        return text, "desc:quote"
    if text:
        text[rng.randrange(len(text))] = rng.choice([0, 0x0A, 0x22, 0x20, rng.randrange(256)])
    return text, "desc:byte"


def _mutate(rng: random.Random, base: Base, files: dict[str, bytearray]) -> str:
    kind = rng.choice(base.kinds)
    binaries = [
        n for n, v in files.items() if v[:4] in (b"KDMV", b"COWD") or n.endswith("sesparse.vmdk")
    ]
    main = files[base.main]
    if kind == "desc":
        if main[:4] == b"KDMV":
            region = main[512:10752]
            end = region.find(b"\0")
            text, tag = _mutate_desc(rng, bytearray(region[: end if end >= 0 else len(region)]))
            main[512:10752] = bytes(text[:10240]).ljust(10240, b"\0")
            return tag
        text, tag = _mutate_desc(rng, main)
        files[base.main] = text
        return tag
    if kind in ("v4", "v3", "gd", "gt", "marker", "gt3"):
        magic = b"COWD" if kind in ("v3", "gt3") else b"KDMV"
        pool = [n for n in binaries if files[n][:4] == magic] or binaries
        if not pool:
            return "none"
        name = rng.choice(pool)
        data = files[name]
        if kind == "v4":
            f = rng.choice(list(VMDK4_FIELDS))
            off, width = VMDK4_FIELDS[f]
            old = _u(data, off, width)
            vals = V4_SPECIAL.get(f, []) * 2 + [_value(rng, old, width, len(data))]
            set_field(data, f, rng.choice(vals))
            return f"v4:{f}"
        if kind == "v3":
            i = rng.randrange(10)
            _put(data, 4 + 4 * i, 4, _value(rng, _u(data, 4 + 4 * i, 4), 4, len(data)))
            return f"v3:{i}"
        if kind == "gt3":
            l1 = _u(data, 20, 4) * 512
            t = _u(data, l1, 4) * 512
            pos = rng.choice([l1, t + 4 * rng.randrange(4096)])
            _put(data, pos, 4, _value(rng, _u(data, pos, 4), 4, len(data)))
            return "v3:table"
        pool = _table_positions(data, rng.choice(["gd", "rgd"]) if kind == "gd" else "gt")
        if not pool:
            return "none"
        pos = rng.choice(pool)
        if kind == "marker":
            grain = _u(data, pos, 4) * 512
            if grain + 12 <= len(data):
                sub = rng.choice([(grain, 8), (grain + 8, 4), (grain + 12 + rng.randrange(64), 1)])
                _put(data, sub[0], sub[1], _value(rng, _u(data, *sub), sub[1], len(data)))
            return "marker"
        _put(data, pos, 4, _value(rng, _u(data, pos, 4), 4, len(data)))
        return kind
    if kind in ("se", "segd", "segt"):
        name = next(n for n in files if n.endswith("sesparse.vmdk"))
        data = files[name]
        if kind == "se":
            r = rng.random()
            if r < 0.6:
                i = rng.randrange(26)
                _put(data, 8 * i, 8, _value(rng, _u(data, 8 * i, 8), 8, len(data)))
                return f"se:{CONST_FIELDS[i]}"
            if r < 0.85:
                vol = _u(data, 80, 8) * 512
                i = rng.randrange(4)
                _put(data, vol + 8 * i, 8, rng.choice([0, 1, 0xCAFECAFD, rng.getrandbits(64)]))
                return "se:volatile"
            data[rng.choice([208 + rng.randrange(304), 512 + 32 + rng.randrange(480)])] = 1
            return "se:pad"
        gd = _u(data, 16 * 8, 8) * 512
        gt = _u(data, 18 * 8, 8) * 512
        if kind == "segd":
            pos = gd + 8 * rng.randrange(4)
            old = _u(data, pos, 8)
        else:
            pos = gt + 8 * rng.randrange(4096 * 2)
            old = _u(data, pos, 8)
        _put(
            data,
            pos,
            8,
            rng.choice(
                [
                    0,
                    0x1000000000000000 | rng.getrandbits(32),
                    old ^ (1 << rng.randrange(64)),
                    rng.getrandbits(64),
                    grain_entry(rng.getrandbits(40)),
                    0x2 << 60,
                    0x5 << 60,
                    old | 1,
                    old & ~(0xF << 60),
                ]
            ),
        )
        return kind
    name = rng.choice(binaries or list(files))
    data = files[name]
    if kind == "trunc":
        n = len(data)
        cut = rng.choice([0, 3, 4, 100, 512, 1024, n // 2, n - 1, rng.randrange(max(n, 1))])
        files[name] = data[: max(0, min(cut, n - 1))]
        return "trunc"
    for _ in range(rng.randint(1, 4) if data else 0):
        data[rng.randrange(0, min(len(data), 2048))] = rng.randrange(256)
    return "bytes"


# -- one case --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    #: The refusal, at blockdev-add or (QSD only, for sizes past 2^63) block-export-add.
    error: dict[str, str] | None = None
    size: int = -1
    reads: dict[int, bytes | int] = field(default_factory=dict)
    seconds: float = 0.0


def _run(
    pair: Pair, side: str, d: Path, main: str, rw: bool, case: int, rng: random.Random
) -> Outcome:
    node = f"m{case}"
    t0 = time.monotonic()
    r = pair.cmd(side, "blockdev-add", vmdk_node(node, d / main, **{"read-only": not rw}))
    out = Outcome(seconds=time.monotonic() - t0)
    if "error" in r:
        out.error = {"class": r["error"]["class"], "desc": r["error"]["desc"]}
        return out
    q = pair.qmp[side]
    r = q.cmd("block-export-add", {"type": "nbd", "id": node, "node-name": node})
    if "error" in r:
        out.error = {"class": r["error"]["class"], "desc": "export: " + r["error"]["desc"]}
        # QSD may keep the node in use after a failed export (each case has its own name).
        q.cmd("blockdev-del", {"node-name": node})
        return out
    c = RawNbd(str(pair.nbd[side]), timeout=REPLY_TIMEOUT if side == "blockd" else 60)
    try:
        c.go(node, contexts=["base:allocation"])
        out.size = c.size
        offsets = list(range(0, min(c.size, READ_CAP), CHUNK))
        if c.size > READ_CAP:
            offsets += sorted({rng.randrange(READ_CAP, c.size) & ~511 for _ in range(2)})
        for off in offsets:
            n = min(CHUNK, c.size - off)
            rep = c.request(P.CMD_READ, off, n, flags=P.CMD_FLAG_DF)
            out.reads[off] = rep["error"] or b"".join(b[8:] for _t, b in rep["chunks"])
        if c.size:
            # The whole disk's status (as much as one reply gives): answered, error or not.
            c.request(P.CMD_BLOCK_STATUS, 0, min(c.size, 0xFFFFFE00))
        c.disconnect()
    finally:
        c.close()
    pair.unexport(side, node)
    q.run("blockdev-del", {"node-name": node})
    return out


def _died(proc: subprocess.Popen[bytes]) -> bool:
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return False
    return True


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def test_mutated_vmdk_images(pair: Pair, tmp_path: Path) -> None:
    work = tmp_path / "bases"
    work.mkdir()
    bases = _bases(work)
    rng = random.Random(SEED)
    stats: dict[str, int] = {}
    problems: list[str] = []
    notes: list[str] = []
    descs: dict[str, int] = {}
    slowest = 0.0
    t_start = time.monotonic()
    for case in range(CASES):
        base = bases[case % len(bases)]
        files = {n: bytearray(v) for n, v in base.files.items()}
        tags = [_mutate(rng, base, files) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        rw = case % 5 == 4
        label = f"case {case} ({base.name}, {'rw' if rw else 'ro'}, {'+'.join(tags)})"
        dirs = {}
        for side in SIDES if rw else ("shared",):
            dd = tmp_path / f"c{case}-{side}"
            dd.mkdir()
            for n, v in files.items():
                (dd / n).write_bytes(bytes(v))
            dirs[side] = dd
        got = {}
        for side in SIDES:
            d = dirs.get(side, dirs.get("shared"))
            try:
                got[side] = _run(pair, side, d, base.main, rw, case, random.Random(case))
            except (OSError, EOFError, AssertionError) as exc:
                if side == "qsd" and _died(pair.daemons["qsd"].proc):
                    # QSD itself crashed (a division by zero, a failed 2 GiB allocation):
                    # nothing to compare with; blockd has answered already.
                    notes.append(f"{label}: QSD crashed ({exc!r:.60})")
                    stats["QSD crashed"] = stats.get("QSD crashed", 0) + 1
                    pair.restart_qsd()
                    got[side] = Outcome(error={"class": "QSD", "desc": "crashed"})
                    continue
                raise AssertionError(f"{label}: {side}: {exc!r}") from exc
        for dd in dirs.values():
            shutil.rmtree(dd)
        mine, theirs = got["blockd"], got["qsd"]
        slowest = max(slowest, mine.seconds)
        if mine.seconds > REPLY_TIMEOUT:
            problems.append(f"{label}: blockdev-add took {mine.seconds:.1f}s")
        assert pair.daemons["blockd"].proc.poll() is None, f"{label}: blockd died"
        pair.qmp["blockd"].run("query-version")
        key = "refused" if mine.error else "opened"
        stats[key] = stats.get(key, 0) + 1
        if mine.error:
            desc = mine.error["desc"]
            if mine.error["class"] != "GenericError" or not desc or "Traceback" in desc:
                problems.append(f"{label}: unclear refusal {mine.error}")
            short = re.sub(r"0x[0-9a-f]+|\d+|'[^']*'", "N", desc)[:80]
            descs[short] = descs.get(short, 0) + 1
        if theirs.error and not mine.error:
            problems.append(f"{label}: QSD refuses ({theirs.error['desc']}) but blockd opens it")
        elif mine.error and not theirs.error:
            stats["refused by blockd only"] = stats.get("refused by blockd only", 0) + 1
            notes.append(f"{label}: only blockd refuses: {mine.error['desc']}")
        elif not mine.error and not theirs.error:
            if mine.size != theirs.size:
                problems.append(f"{label}: size {mine.size}, QSD {theirs.size}")
            elif not rw:
                for off, b in mine.reads.items():
                    q = theirs.reads.get(off)
                    if isinstance(b, bytes) and isinstance(q, bytes) and b != q:
                        problems.append(f"{label}: data at {off} differs from QSD's")
                        break
                    if isinstance(b, bytes) != isinstance(q, bytes):
                        notes.append(f"{label}: at {off} blockd {type(b).__name__}, QSD {q!r:.20}")
                        stats["read outcome differs"] = stats.get("read outcome differs", 0) + 1
                        break
    elapsed = time.monotonic() - t_start
    print(f"\n{CASES} cases in {elapsed:.1f}s, slowest blockdev-add {slowest:.2f}s: {stats}")
    for d, n in sorted(descs.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4}x {d}")
    for n in notes:
        print("  note:", n)
    hwm = _hwm_kib(pair.daemons["blockd"].proc.pid)
    print(f"  blockd peak RSS {hwm // 1024} MiB")
    # Nothing left behind by refused opens (implicit extent and backing nodes included).
    left = pair.qmp["blockd"].run("query-named-block-nodes")["return"]
    assert not [n["node-name"] for n in left if str(tmp_path) in n["file"]]
    assert not problems, "\n".join(problems[:30]) + f"\n({len(problems)} problems)"
    assert stats.get("refused", 0) >= CASES // 5 and stats.get("opened", 0) >= CASES // 5, stats
    assert hwm < 512 * 1024
