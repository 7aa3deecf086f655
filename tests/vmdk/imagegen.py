"""Generators of the vmdk layouts no tool here writes, built byte by byte from the specs:
seSparse (VMware ESXi 6.5+ snapshots, from ../shared/docs/sesparse.md) and VMDK3 ("COWD",
vmfsSparse). Each returns, with the image, the guest bytes it must read as, so a test can
first prove the generator with qemu-img and then hold blockd to the same bytes.

Knobs for corrupt variants: header fields, paddings, grain directory and grain table
entries can be overridden after the layout is computed.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
GRAIN = 4096
GT_ENTRIES = 4096
GT_SPAN = GRAIN * GT_ENTRIES  # 16 MiB of guest per grain table
CONST_MAGIC = 0xCAFEBABE
VOLATILE_MAGIC = 0xCAFECAFE
VERSION_2_1 = 0x0000000200000001

# Names of the 26 const header fields, in order.
CONST_FIELDS = [
    "magic",
    "version",
    "capacity",
    "grain_size",
    "grain_table_size",
    "flags",
    "reserved1",
    "reserved2",
    "reserved3",
    "reserved4",
    "volatile_header_offset",
    "volatile_header_size",
    "journal_header_offset",
    "journal_header_size",
    "journal_offset",
    "journal_size",
    "grain_dir_offset",
    "grain_dir_size",
    "grain_tables_offset",
    "grain_tables_size",
    "free_bitmap_offset",
    "free_bitmap_size",
    "backmap_offset",
    "backmap_size",
    "grains_offset",
    "grains_size",
]


def grain_entry(index: int, top: int = 3) -> int:
    """A grain table entry of type *top* pointing to stored grain *index* (the low 12 bits
    of the index sit in bits 48-59, the rest in bits 0-47)."""
    return (top << 60) | ((index & 0xFFF) << 48) | (index >> 12)


@dataclass
class SeSparse:
    """What to build: *grains* maps guest grain numbers to ``bytes`` (4 KiB of data),
    ``"zero"`` or ``"unmapped"``; grains not listed are unallocated."""

    capacity: int  # bytes, a multiple of 512
    grains: dict[int, bytes | str] = field(default_factory=dict)
    cid: int = 0x5E5E5E5E
    parent: Path | None = None
    parent_cid: int = 0xFFFFFFFF
    #: Const header fields to override, by name.
    header: dict[str, int] = field(default_factory=dict)
    const_pad: bytes = b""
    volatile: dict[str, int] = field(default_factory=dict)
    volatile_pad: bytes = b""
    #: Grain directory entries to override: index -> raw value.
    gd: dict[int, int] = field(default_factory=dict)
    #: Grain table entries to override: guest grain number -> raw value.
    gt: dict[int, int] = field(default_factory=dict)
    #: Sectors the descriptor's extent line claims (QEMU ignores it); the capacity by default.
    line_sectors: int | None = None
    seed: int = 1


def build_sesparse(
    directory: Path, name: str, spec: SeSparse, parent_data: bytes | None = None
) -> tuple[Path, bytes]:
    """Write ``name.vmdk`` (the descriptor) and ``name-sesparse.vmdk`` (the extent); return
    the descriptor's path and the guest bytes it reads as (*parent_data* where unallocated)."""
    rng = random.Random(spec.seed)
    capacity_sectors = spec.capacity // SECTOR
    n_tables = -(-spec.capacity // GT_SPAN)
    gd_sectors = max(1, -(-n_tables * 8 // SECTOR))
    layout = {
        "volatile_header_offset": 1,
        "volatile_header_size": 1,
        "journal_header_offset": 2,
        "journal_header_size": 2,
        "journal_offset": 8,
        "journal_size": 8,
        "grain_dir_offset": 16,
        "grain_dir_size": gd_sectors,
    }
    gt_off = -(-(16 + gd_sectors) // 8) * 8
    layout["grain_tables_offset"] = gt_off
    layout["grain_tables_size"] = n_tables * 64
    fb = gt_off + n_tables * 64
    layout.update(free_bitmap_offset=fb, free_bitmap_size=8, backmap_offset=fb + 8)
    layout.update(backmap_size=8, grains_offset=fb + 16)
    stored = [g for g, v in spec.grains.items() if isinstance(v, bytes)]
    # Stored grain numbers spread over more than 4096, so both halves of an entry matter.
    slots = rng.sample(range(2 * GT_ENTRIES), len(stored)) if stored else []
    layout["grains_size"] = (max(slots, default=-1) + 1) * 8
    fields = {
        "magic": CONST_MAGIC,
        "version": VERSION_2_1,
        "capacity": capacity_sectors,
        "grain_size": 8,
        "grain_table_size": 64,
        "flags": 0,
        "reserved1": 0,
        "reserved2": 0,
        "reserved3": 0,
        "reserved4": 0,
        **layout,
    }
    fields.update(spec.header)

    # Tables in a shuffled order, so a directory entry's index is not its position.
    order = list(range(n_tables))
    rng.shuffle(order)
    tables = [bytearray(GT_ENTRIES * 8) for _ in range(n_tables)]
    used = set()
    slot_of = dict(zip(stored, slots, strict=True))
    for g, v in sorted(spec.grains.items()):
        if isinstance(v, bytes):
            entry = grain_entry(slot_of[g])
        elif v == "zero":
            entry = 2 << 60
        elif v == "unmapped":
            entry = grain_entry(rng.randrange(1 << 20), top=1)
        else:
            raise ValueError(v)
        struct.pack_into("<Q", tables[g // GT_ENTRIES], (g % GT_ENTRIES) * 8, entry)
        used.add(g // GT_ENTRIES)
    for g, raw in spec.gt.items():
        struct.pack_into("<Q", tables[g // GT_ENTRIES], (g % GT_ENTRIES) * 8, raw)
        used.add(g // GT_ENTRIES)
    gd = bytearray(gd_sectors * SECTOR)
    for t in used:
        struct.pack_into("<Q", gd, t * 8, 0x1000000000000000 | order[t])
    for i, raw in spec.gd.items():
        struct.pack_into("<Q", gd, i * 8, raw)

    ext = directory / f"{name}-sesparse.vmdk"
    with open(ext, "wb") as f:
        const = struct.pack("<26Q", *(fields[n] & (2**64 - 1) for n in CONST_FIELDS))
        f.write(const + spec.const_pad.ljust(304, b"\0")[:304])
        vol = {
            "magic": VOLATILE_MAGIC,
            "free_gt_number": n_tables,
            "next_txn_seq_number": 7,
            "replay_journal": 0,
        }
        vol.update(spec.volatile)
        f.seek(layout["volatile_header_offset"] * SECTOR)
        f.write(struct.pack("<4Q", *vol.values()) + spec.volatile_pad.ljust(480, b"\0")[:480])
        f.seek(layout["grain_dir_offset"] * SECTOR)
        f.write(gd)
        for t in range(n_tables):
            f.seek((gt_off + order[t] * 64) * SECTOR)
            f.write(tables[t])
        for g, slot in slot_of.items():
            f.seek((layout["grains_offset"] + slot * 8) * SECTOR)
            f.write(spec.grains[g])  # type: ignore[arg-type]
        f.truncate((layout["grains_offset"] + layout["grains_size"]) * SECTOR)

    desc = directory / f"{name}.vmdk"
    hint = f'parentFileNameHint="{spec.parent.name}"\n' if spec.parent else ""
    sectors = spec.line_sectors if spec.line_sectors is not None else capacity_sectors
    desc.write_text(
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={spec.cid:08x}\n"
        f"parentCID={spec.parent_cid:08x}\n"
        'createType="seSparse"\n'
        f"{hint}"
        "\n# Extent description\n"
        f'RW {sectors} SESPARSE "{ext.name}"\n'
        "\n# The Disk Data Base\n#DDB\n\n"
        'ddb.longContentID = "0123456789abcdef0123456789abcdef"\n'
        'ddb.virtualHWVersion = "14"\n'
    )
    want = bytearray(parent_data[: spec.capacity] if parent_data else b"")
    want += bytes(spec.capacity - len(want))
    for g, v in spec.grains.items():
        start = g * GRAIN
        chunk = v if isinstance(v, bytes) else bytes(GRAIN)
        want[start : start + GRAIN] = chunk[: max(0, spec.capacity - start)]
    return desc, bytes(want)


def random_grains(rng: random.Random, capacity: int, count: int) -> dict[int, bytes | str]:
    """*count* grains spread over the disk: mostly data, some zero and unmapped ones."""
    picks = rng.sample(range(capacity // GRAIN), count)
    out: dict[int, bytes | str] = {}
    for i, g in enumerate(picks):
        out[g] = "zero" if i % 7 == 3 else "unmapped" if i % 7 == 5 else rng.randbytes(GRAIN)
    return out


def build_vmdk3(
    directory: Path, name: str, capacity: int, grains: dict[int, bytes], granularity: int = 8
) -> tuple[Path, bytes]:
    """A vmfsSparse disk: a descriptor and one ``COWD`` extent with 32-bit tables of 4096
    entries; *grains* maps grain numbers (of *granularity* sectors) to their bytes."""
    gsize = granularity * SECTOR
    per_table = 4096 * gsize
    n_tables = -(-capacity // per_table)
    l1_sectors = -(-n_tables * 4 // SECTOR)
    l1_at = 4
    tables_at = l1_at + l1_sectors
    data_at = tables_at + n_tables * 32
    header = struct.pack(
        "<4s10I",
        b"COWD",
        1,
        3,
        capacity // SECTOR,
        granularity,
        l1_at,
        n_tables,
        0,
        0,
        0,
        0,
    )
    img = bytearray(data_at * SECTOR)
    img[: len(header)] = header
    want = bytearray(capacity)
    for t in range(n_tables):
        struct.pack_into("<I", img, l1_at * SECTOR + t * 4, tables_at + t * 32)
    # Stored grains in reverse order: a grain's place in the file is not its place on disk.
    for slot, g in enumerate(sorted(grains, reverse=True)):
        sector = data_at + slot * granularity
        struct.pack_into(
            "<I", img, (tables_at + (g // 4096) * 32) * SECTOR + (g % 4096) * 4, sector
        )
        img += bytes(sector * SECTOR + gsize - len(img))
        img[sector * SECTOR : sector * SECTOR + gsize] = grains[g]
        want[g * gsize : g * gsize + gsize] = grains[g][: max(0, capacity - g * gsize)]
    ext = directory / f"{name}-cowd.vmdk"
    ext.write_bytes(bytes(img))
    desc = directory / f"{name}.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        f'createType="vmfsSparse"\n\n# Extent description\n'
        f'RW {capacity // SECTOR} VMFSSPARSE "{ext.name}"\n'
    )
    return desc, bytes(want)


# -- VMDK4 header fields (offset in the file, width) for mutations ------------------------------
VMDK4_FIELDS = {
    "version": (4, 4),
    "flags": (8, 4),
    "capacity": (12, 8),
    "granularity": (20, 8),
    "desc_offset": (28, 8),
    "desc_size": (36, 8),
    "num_gtes_per_gt": (44, 4),
    "rgd_offset": (48, 8),
    "gd_offset": (56, 8),
    "grain_offset": (64, 8),
    "compress_algorithm": (77, 2),
}


def set_field(data: bytearray, name: str, value: int) -> bytearray:
    off, width = VMDK4_FIELDS[name]
    data[off : off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return data


def get_field(data: bytes | bytearray, name: str) -> int:
    off, width = VMDK4_FIELDS[name]
    return int.from_bytes(data[off : off + width], "little")
