"""The backup directory on disk: its state file, its chains and their manifests.

Layout of a directory ``D``::

    D/blockd-backup.json          directory state: id, next point number, the run marker,
                                  the last failure, bitmaps still to remove
    D/chain-0001/manifest.json    one chain: its disks and points (schema-versioned JSON)
    D/chain-0001/disk0.0001.qcow2 a layer: the full backup of disk0 at point 1
    D/chain-0001/disk0.0001.sums  that layer's chunk hashes (see digest.py)
    D/chain-0001/disk0.0002.qcow2 an incremental, backed by "disk0.0001.qcow2" (relative)

A chain is named after the point that started it. Layers are named after the point that
created them; after a prune the oldest file of a chain holds the oldest kept point, which the
manifest says. Every file here is replaced atomically (written beside, flushed, renamed,
directory flushed), so a crash leaves the old version or the new one.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockd.tools.backup.errors import ToolError

SCHEMA = 1
STATE = "blockd-backup.json"
MANIFEST = "manifest.json"
CHAIN_PREFIX = "chain-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ToolError(f"cannot write {path}: {exc.strerror or exc}") from None
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ToolError(f"cannot read {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise ToolError(f"{path} is not a blockd-backup file")
    schema = obj.get("schema")
    if schema != SCHEMA:
        raise ToolError(
            f"{path} has schema {schema}; this blockd-backup reads schema {SCHEMA} only"
        )
    return obj


# -- chains and points ---------------------------------------------------------------------------
@dataclass
class DiskPoint:
    """One disk at one point: the layer that holds it and what it holds."""

    layer: str
    sums: str
    size: int
    copied: int
    stored: int
    digest: str
    bitmap: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DiskPoint:
        return cls(**{k: obj[k] for k in cls.__dataclass_fields__})


@dataclass
class Point:
    point: int
    time: str
    level: str
    reason: str
    seconds: float
    disks: dict[str, DiskPoint]
    #: Points whose layers a prune merged into this one (they are gone).
    merged: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "disks"}
        out["disks"] = {name: d.to_json() for name, d in self.disks.items()}
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Point:
        disks = {name: DiskPoint.from_json(d) for name, d in obj["disks"].items()}
        return cls(
            point=obj["point"],
            time=obj["time"],
            level=obj["level"],
            reason=obj.get("reason", ""),
            seconds=obj.get("seconds", 0.0),
            disks=disks,
            merged=list(obj.get("merged", [])),
        )


@dataclass
class Chain:
    path: Path
    chain: int
    disks: list[str]
    cluster_size: int
    created: str
    points: list[Point] = field(default_factory=list)
    #: An unfinished prune (see prune.py); None when there is none.
    journal: dict[str, Any] | None = None

    @property
    def manifest(self) -> Path:
        return self.path / MANIFEST

    def point(self, number: int) -> Point | None:
        return next((p for p in self.points if p.point == number), None)

    def points_up_to(self, number: int) -> list[Point]:
        """The chain's points from its base to point *number*: one layer per disk each."""
        out = []
        for p in self.points:
            out.append(p)
            if p.point == number:
                return out
        raise KeyError(number)

    def sums_up_to(self, number: int, disk: str) -> list[str]:
        """The sums files whose overlay is *disk* at point *number*, base first. While a
        prune's merge is unfinished, the chain's first point is still an incremental over
        a base that is no longer a point; the journal's merged sums stand for both then."""
        upto = self.points_up_to(number)
        j = self.journal
        if j is not None and j["phase"] == "merge":
            return [j["merged-sums"][disk]] + [p.disks[disk].sums for p in upto[1:]]
        return [p.disks[disk].sums for p in upto]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "kind": "blockd-backup chain",
            "chain": self.chain,
            "disks": self.disks,
            "cluster-size": self.cluster_size,
            "created": self.created,
            "points": [p.to_json() for p in self.points],
            "journal": self.journal,
        }

    def save(self) -> None:
        write_json(self.manifest, self.to_json())

    @classmethod
    def load(cls, path: Path) -> Chain:
        obj = read_json(path / MANIFEST)
        return cls(
            path=path,
            chain=obj["chain"],
            disks=list(obj["disks"]),
            cluster_size=obj["cluster-size"],
            created=obj["created"],
            points=[Point.from_json(p) for p in obj["points"]],
            journal=obj.get("journal"),
        )


def chain_dir_name(chain: int) -> str:
    return f"{CHAIN_PREFIX}{chain:04d}"


def layer_name(disk: str, point: int) -> str:
    return f"{disk}.{point:04d}.qcow2"


def sums_name(disk: str, point: int) -> str:
    return f"{disk}.{point:04d}.sums"


# -- the directory -------------------------------------------------------------------------------
@dataclass
class DirState:
    """``blockd-backup.json``: what is not part of any one chain."""

    id: str
    next_point: int = 1
    #: The run under way (or interrupted: its process is gone when the lock is free).
    run: dict[str, Any] | None = None
    #: Why the last run failed; while set, no bitmap is trusted for an incremental.
    last_failure: dict[str, Any] | None = None
    #: Bitmaps of ended chains that could not be removed yet: [{"node", "name"}].
    stale_bitmaps: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "kind": "blockd-backup directory",
            "id": self.id,
            "next-point": self.next_point,
            "run": self.run,
            "last-failure": self.last_failure,
            "stale-bitmaps": self.stale_bitmaps,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DirState:
        return cls(
            id=obj["id"],
            next_point=obj["next-point"],
            run=obj.get("run"),
            last_failure=obj.get("last-failure"),
            stale_bitmaps=list(obj.get("stale-bitmaps", [])),
        )


class BackupDir:
    def __init__(self, path: Path, state: DirState) -> None:
        self.path = path
        self.state = state

    @classmethod
    def open(cls, path: Path, create: bool = False) -> BackupDir:
        # Absolute: the daemon opens the layers by name, and its working directory is not
        # ours (qemu-storage-daemon --daemonize runs in /).
        path = Path(os.path.abspath(path))
        if not path.is_dir():
            if not create:
                raise ToolError(f"{path} is not a directory")
            try:
                path.mkdir(parents=True)
            except OSError as exc:
                raise ToolError(f"cannot create {path}: {exc.strerror}") from None
        try:
            state = DirState.from_json(read_json(path / STATE))
        except FileNotFoundError:
            if not create:
                raise ToolError(f"{path} holds no blockd-backup backups") from None
            if any(p.name.startswith(CHAIN_PREFIX) for p in path.iterdir()):
                raise ToolError(f"{path} has chains but no {STATE}; refusing to guess") from None
            state = DirState(id=secrets.token_hex(3))
            write_json(path / STATE, state.to_json())
        except KeyError as exc:
            raise ToolError(f"{path / STATE} lacks {exc}") from None
        return cls(path, state)

    def save_state(self) -> None:
        write_json(self.path / STATE, self.state.to_json())

    def chains(self) -> list[Chain]:
        """Every chain with a manifest, oldest first. (A chain directory without one is the
        leftover of a first run that failed; the run marker or a prune removes it.)"""
        out = []
        for sub in sorted(self.path.glob(f"{CHAIN_PREFIX}*")):
            if (sub / MANIFEST).exists():
                try:
                    out.append(Chain.load(sub))
                except KeyError as exc:
                    raise ToolError(f"{sub / MANIFEST} lacks {exc}") from None
        return out

    def latest_chain(self) -> Chain | None:
        chains = [c for c in self.chains() if c.points]
        return chains[-1] if chains else None

    def find_point(self, number: int | None) -> tuple[Chain, Point]:
        """Point *number* (None: the newest) and its chain."""
        chains = self.chains()
        every = [(c, p) for c in chains for p in c.points]
        if not every:
            raise ToolError(f"{self.path} holds no backup point yet")
        if number is None:
            return every[-1]
        for c, p in every:
            if p.point == number:
                return c, p
        have = ", ".join(str(p.point) for _, p in every)
        raise ToolError(f"{self.path} has no point {number} (points: {have})")

    # -- names the daemon sees (short: node names and job ids are limited to 31 bytes) -----
    def bitmap_name(self, chain: int) -> str:
        return f"blockd-backup-{self.state.id}-{chain}"

    @property
    def prefix(self) -> str:
        """Start of every job id and node name this directory's runs create."""
        return f"bb{self.state.id}-"

    def job_id(self, point: int, index: int) -> str:
        return f"{self.prefix}j{point}-{index}"

    def target_node(self, point: int, index: int) -> str:
        return f"{self.prefix}t{point}-{index}"
