"""Block graph models: ``blockdev-add`` options, ``blockdev-create`` options and the
``query-named-block-nodes`` reply (QEMU's qapi/block-core.json, the parts blockd implements).

The ``driver`` enum lists only drivers blockd really has: a client probing introspection for a
driver learns the truth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from pydantic import Field

from blockd.qapi.base import Int64, QapiEnum, QapiModel, Size, UInt32, alternate, flat_union


class BlockdevDriver(QapiEnum):
    BLKDEBUG = "blkdebug"
    FILE = "file"
    NBD = "nbd"
    NULL_CO = "null-co"
    QCOW2 = "qcow2"
    RAW = "raw"
    SSH = "ssh"
    VMDK = "vmdk"


class BlockdevDiscardOptions(QapiEnum):
    IGNORE = "ignore"
    UNMAP = "unmap"


class BlockdevDetectZeroesOptions(QapiEnum):
    OFF = "off"
    ON = "on"
    UNMAP = "unmap"


class BlockdevAioOptions(QapiEnum):
    THREADS = "threads"
    NATIVE = "native"
    IO_URING = "io_uring"


class OnOffAuto(QapiEnum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class PreallocMode(QapiEnum):
    OFF = "off"
    METADATA = "metadata"
    FALLOC = "falloc"
    FULL = "full"


class BlockdevCacheOptions(QapiModel):
    direct: bool | None = None
    no_flush: bool | None = None


class BlockdevOptionsBase(QapiModel):
    """Members every driver takes."""

    driver: BlockdevDriver
    node_name: str | None = None
    discard: BlockdevDiscardOptions | None = None
    cache: BlockdevCacheOptions | None = None
    read_only: bool | None = None
    auto_read_only: bool | None = None
    force_share: bool | None = None
    detect_zeroes: BlockdevDetectZeroesOptions | None = None


class BlockdevOptionsFile(BlockdevOptionsBase):
    driver: Literal[BlockdevDriver.FILE]
    filename: str
    pr_manager: str | None = None
    locking: OnOffAuto | None = None
    aio: BlockdevAioOptions | None = None
    aio_max_batch: int | None = None
    drop_cache: bool | None = None
    x_check_cache_dropped: bool | None = None


class BlockdevOptionsRaw(BlockdevOptionsBase):
    driver: Literal[BlockdevDriver.RAW]
    file: BlockdevRef
    offset: Size | None = None
    size: Size | None = None


class BlockdevOptionsNull(BlockdevOptionsBase):
    driver: Literal[BlockdevDriver.NULL_CO]
    size: Size | None = None
    latency_ns: Size | None = None
    read_zeroes: bool | None = None


class BlkdebugEvent(QapiEnum):
    L1_UPDATE = "l1_update"
    L1_GROW_ALLOC_TABLE = "l1_grow_alloc_table"
    L1_GROW_WRITE_TABLE = "l1_grow_write_table"
    L1_GROW_ACTIVATE_TABLE = "l1_grow_activate_table"
    L2_LOAD = "l2_load"
    L2_UPDATE = "l2_update"
    L2_UPDATE_COMPRESSED = "l2_update_compressed"
    L2_ALLOC_COW_READ = "l2_alloc_cow_read"
    L2_ALLOC_WRITE = "l2_alloc_write"
    READ_AIO = "read_aio"
    READ_BACKING_AIO = "read_backing_aio"
    READ_COMPRESSED = "read_compressed"
    WRITE_AIO = "write_aio"
    WRITE_COMPRESSED = "write_compressed"
    VMSTATE_LOAD = "vmstate_load"
    VMSTATE_SAVE = "vmstate_save"
    COW_READ = "cow_read"
    COW_WRITE = "cow_write"
    REFTABLE_LOAD = "reftable_load"
    REFTABLE_GROW = "reftable_grow"
    REFTABLE_UPDATE = "reftable_update"
    REFBLOCK_LOAD = "refblock_load"
    REFBLOCK_UPDATE = "refblock_update"
    REFBLOCK_UPDATE_PART = "refblock_update_part"
    REFBLOCK_ALLOC = "refblock_alloc"
    REFBLOCK_ALLOC_HOOKUP = "refblock_alloc_hookup"
    REFBLOCK_ALLOC_WRITE = "refblock_alloc_write"
    REFBLOCK_ALLOC_WRITE_BLOCKS = "refblock_alloc_write_blocks"
    REFBLOCK_ALLOC_WRITE_TABLE = "refblock_alloc_write_table"
    REFBLOCK_ALLOC_SWITCH_TABLE = "refblock_alloc_switch_table"
    CLUSTER_ALLOC = "cluster_alloc"
    CLUSTER_ALLOC_BYTES = "cluster_alloc_bytes"
    CLUSTER_FREE = "cluster_free"
    FLUSH_TO_OS = "flush_to_os"
    FLUSH_TO_DISK = "flush_to_disk"
    PWRITEV_RMW_HEAD = "pwritev_rmw_head"
    PWRITEV_RMW_AFTER_HEAD = "pwritev_rmw_after_head"
    PWRITEV_RMW_TAIL = "pwritev_rmw_tail"
    PWRITEV_RMW_AFTER_TAIL = "pwritev_rmw_after_tail"
    PWRITEV = "pwritev"
    PWRITEV_ZERO = "pwritev_zero"
    PWRITEV_DONE = "pwritev_done"
    EMPTY_IMAGE_PREPARE = "empty_image_prepare"
    L1_SHRINK_WRITE_TABLE = "l1_shrink_write_table"
    L1_SHRINK_FREE_L2_CLUSTERS = "l1_shrink_free_l2_clusters"
    COR_WRITE = "cor_write"
    CLUSTER_ALLOC_SPACE = "cluster_alloc_space"
    NONE = "none"


class BlkdebugIOType(QapiEnum):
    READ = "read"
    WRITE = "write"
    WRITE_ZEROES = "write-zeroes"
    DISCARD = "discard"
    FLUSH = "flush"
    BLOCK_STATUS = "block-status"


class BlkdebugInjectErrorOptions(QapiModel):
    event: BlkdebugEvent
    state: int | None = None
    iotype: BlkdebugIOType | None = None
    errno: int | None = None
    sector: int | None = None
    once: bool | None = None
    immediately: bool | None = None


class BlkdebugSetStateOptions(QapiModel):
    event: BlkdebugEvent
    state: int | None = None
    new_state: int = Field(alias="new_state")


class BlockPermission(QapiEnum):
    CONSISTENT_READ = "consistent-read"
    WRITE = "write"
    WRITE_UNCHANGED = "write-unchanged"
    RESIZE = "resize"


class BlockdevOptionsBlkdebug(BlockdevOptionsBase):
    driver: Literal[BlockdevDriver.BLKDEBUG]
    image: BlockdevRef
    config: str | None = None
    # Range and constraint checks live in the driver, with QEMU's texts and order.
    align: Int64 | None = None
    max_transfer: Int64 | None = None
    opt_write_zero: Int64 | None = None
    max_write_zero: Int64 | None = None
    opt_discard: Int64 | None = None
    max_discard: Int64 | None = None
    inject_error: list[BlkdebugInjectErrorOptions] | None = None
    set_state: list[BlkdebugSetStateOptions] | None = None
    take_child_perms: list[BlockPermission] | None = None
    unshare_child_perms: list[BlockPermission] | None = None


class Qcow2OverlapCheckMode(QapiEnum):
    NONE = "none"
    CONSTANT = "constant"
    CACHED = "cached"
    ALL = "all"


class BlockdevOptionsQcow2(BlockdevOptionsBase):
    driver: Literal[BlockdevDriver.QCOW2]
    file: BlockdevRef
    backing: BlockdevRefOrNull | None = None
    lazy_refcounts: bool | None = None
    pass_discard_request: bool | None = None
    pass_discard_snapshot: bool | None = None
    pass_discard_other: bool | None = None
    overlap_check: Qcow2OverlapCheckMode | None = None
    cache_size: Size | None = None
    l2_cache_size: Size | None = None
    l2_cache_entry_size: Size | None = None
    refcount_cache_size: Size | None = None
    cache_clean_interval: Size | None = None
    data_file: BlockdevRef | None = None


class NetworkAddressFamily(QapiEnum):
    INET = "inet"
    UNIX = "unix"
    VSOCK = "vsock"
    FD = "fd"


class InetSocketAddress(QapiModel):
    host: str
    port: str
    numeric: bool | None = None
    to: int | None = None
    ipv4: bool | None = None
    ipv6: bool | None = None
    keep_alive: bool | None = None
    mptcp: bool | None = None


class UnixSocketAddress(QapiModel):
    path: str
    abstract: bool | None = None
    tight: bool | None = None


class VsockSocketAddress(QapiModel):
    cid: str
    port: str


class String(QapiModel):
    str: str


class SocketAddressBase(QapiModel):
    type: NetworkAddressFamily


# The flat SocketAddress branches are the plain address objects plus the ``type`` tag; the
# wrapped SocketAddressLegacy (blockd/qapi/export.py) carries the same objects under ``data``.
class InetSocketAddressFlat(SocketAddressBase, InetSocketAddress):
    type: Literal[NetworkAddressFamily.INET]


class UnixSocketAddressFlat(SocketAddressBase, UnixSocketAddress):
    type: Literal[NetworkAddressFamily.UNIX]


class VsockSocketAddressFlat(SocketAddressBase, VsockSocketAddress):
    type: Literal[NetworkAddressFamily.VSOCK]


class FdSocketAddressFlat(SocketAddressBase, String):
    type: Literal[NetworkAddressFamily.FD]


if TYPE_CHECKING:
    SocketAddress: TypeAlias = (
        InetSocketAddressFlat | UnixSocketAddressFlat | VsockSocketAddressFlat | FdSocketAddressFlat
    )
else:
    SocketAddress = flat_union(
        "SocketAddress",
        "type",
        {
            "inet": InetSocketAddressFlat,
            "unix": UnixSocketAddressFlat,
            "vsock": VsockSocketAddressFlat,
            "fd": FdSocketAddressFlat,
        },
    )


class BlockdevOptionsNbd(BlockdevOptionsBase):
    driver: Literal[BlockdevDriver.NBD]
    server: SocketAddress
    export: str | None = None
    tls_creds: str | None = None
    tls_hostname: str | None = None
    x_dirty_bitmap: str | None = None
    reconnect_delay: UInt32 | None = None
    open_timeout: UInt32 | None = None


class SshHostKeyCheckMode(QapiEnum):
    NONE = "none"
    HASH = "hash"
    KNOWN_HOSTS = "known_hosts"


class SshHostKeyCheckHashType(QapiEnum):
    MD5 = "md5"
    SHA1 = "sha1"
    SHA256 = "sha256"


class SshHostKeyCheckBase(QapiModel):
    mode: SshHostKeyCheckMode


class SshHostKeyCheckNone(SshHostKeyCheckBase):
    mode: Literal[SshHostKeyCheckMode.NONE]


class SshHostKeyHash(SshHostKeyCheckBase):
    mode: Literal[SshHostKeyCheckMode.HASH]
    type: SshHostKeyCheckHashType
    hash: str


class SshHostKeyCheckKnownHosts(SshHostKeyCheckBase):
    mode: Literal[SshHostKeyCheckMode.KNOWN_HOSTS]


if TYPE_CHECKING:
    SshHostKeyCheck: TypeAlias = SshHostKeyCheckNone | SshHostKeyHash | SshHostKeyCheckKnownHosts
else:
    SshHostKeyCheck = flat_union(
        "SshHostKeyCheck",
        "mode",
        {
            "none": SshHostKeyCheckNone,
            "hash": SshHostKeyHash,
            "known_hosts": SshHostKeyCheckKnownHosts,
        },
    )


class BlockdevOptionsSshLocation(QapiModel):
    """QEMU's BlockdevOptionsSsh proper: ``blockdev-add`` adds the generic node members,
    ``blockdev-create`` takes it as ``location``."""

    server: InetSocketAddress
    path: str
    user: str | None = None
    host_key_check: SshHostKeyCheck | None = None


class BlockdevOptionsSsh(BlockdevOptionsBase, BlockdevOptionsSshLocation):
    driver: Literal[BlockdevDriver.SSH]


class BlockdevOptionsVmdk(BlockdevOptionsBase):
    """QEMU's BlockdevOptionsGenericCOWFormat, which its vmdk branch uses."""

    driver: Literal[BlockdevDriver.VMDK]
    file: BlockdevRef
    backing: BlockdevRefOrNull | None = None


if TYPE_CHECKING:
    BlockdevOptions: TypeAlias = (
        BlockdevOptionsBlkdebug
        | BlockdevOptionsFile
        | BlockdevOptionsNbd
        | BlockdevOptionsNull
        | BlockdevOptionsQcow2
        | BlockdevOptionsRaw
        | BlockdevOptionsSsh
        | BlockdevOptionsVmdk
    )
    BlockdevRef: TypeAlias = BlockdevOptions | str
    BlockdevRefOrNull: TypeAlias = BlockdevOptions | str | None
else:
    BlockdevOptions = flat_union(
        "BlockdevOptions",
        "driver",
        {
            "blkdebug": BlockdevOptionsBlkdebug,
            "file": BlockdevOptionsFile,
            "nbd": BlockdevOptionsNbd,
            "null-co": BlockdevOptionsNull,
            "qcow2": BlockdevOptionsQcow2,
            "raw": BlockdevOptionsRaw,
            "ssh": BlockdevOptionsSsh,
            "vmdk": BlockdevOptionsVmdk,
        },
    )
    BlockdevRef = alternate("BlockdevRef", {"object": BlockdevOptions, "string": str})
    BlockdevRefOrNull = alternate(
        "BlockdevRefOrNull", {"object": BlockdevOptions, "string": str, "null": None}
    )

for _m in (BlockdevOptionsRaw, BlockdevOptionsBlkdebug, BlockdevOptionsQcow2, BlockdevOptionsVmdk):
    _m.model_rebuild()


# -- blockdev-create -------------------------------------------------------------------------
class BlockdevCreateOptionsBase(QapiModel):
    driver: BlockdevDriver


class BlockdevCreateOptionsFile(BlockdevCreateOptionsBase):
    driver: Literal[BlockdevDriver.FILE]
    filename: str
    size: Size
    preallocation: PreallocMode | None = None
    nocow: bool | None = None
    extent_size_hint: Size | None = None


class BlockdevQcow2Version(QapiEnum):
    V2 = "v2"
    V3 = "v3"


class Qcow2CompressionType(QapiEnum):
    ZLIB = "zlib"
    ZSTD = "zstd"


class BlockdevCreateOptionsQcow2(BlockdevCreateOptionsBase):
    driver: Literal[BlockdevDriver.QCOW2]
    file: BlockdevRef
    data_file: BlockdevRef | None = None
    data_file_raw: bool | None = None
    extended_l2: bool | None = None
    size: Size
    version: BlockdevQcow2Version | None = None
    backing_file: str | None = None
    backing_fmt: BlockdevDriver | None = None
    cluster_size: Size | None = None
    preallocation: PreallocMode | None = None
    lazy_refcounts: bool | None = None
    refcount_bits: int | None = None
    compression_type: Qcow2CompressionType | None = None


class BlockdevCreateOptionsSsh(BlockdevCreateOptionsBase):
    driver: Literal[BlockdevDriver.SSH]
    location: BlockdevOptionsSshLocation
    size: Size


class BlockdevVmdkSubformat(QapiEnum):
    MONOLITHIC_SPARSE = "monolithicSparse"
    MONOLITHIC_FLAT = "monolithicFlat"
    TWO_GB_MAX_EXTENT_SPARSE = "twoGbMaxExtentSparse"
    TWO_GB_MAX_EXTENT_FLAT = "twoGbMaxExtentFlat"
    STREAM_OPTIMIZED = "streamOptimized"


class BlockdevVmdkAdapterType(QapiEnum):
    IDE = "ide"
    BUSLOGIC = "buslogic"
    LSILOGIC = "lsilogic"
    LEGACY_ESX = "legacyESX"


class BlockdevCreateOptionsVmdk(BlockdevCreateOptionsBase):
    driver: Literal[BlockdevDriver.VMDK]
    file: BlockdevRef
    size: Size
    extents: list[BlockdevRef] | None = None
    subformat: BlockdevVmdkSubformat | None = None
    backing_file: str | None = None
    adapter_type: BlockdevVmdkAdapterType | None = None
    hwversion: str | None = None
    toolsversion: str | None = None
    zeroed_grain: bool | None = None


def _no_create_branch(value: str) -> type[BlockdevCreateOptionsBase]:
    # Drivers without create options still parse ("Driver does not support blockdev-create"
    # comes later), as in QEMU where the union has an empty branch for them.
    return type(
        f"BlockdevCreateOptions_{value.replace('-', '_')}",
        (BlockdevCreateOptionsBase,),
        {"__annotations__": {"driver": Literal[BlockdevDriver(value)]}},
    )


_CREATE_BRANCHES: dict[BlockdevDriver, type[BlockdevCreateOptionsBase]] = {
    BlockdevDriver.FILE: BlockdevCreateOptionsFile,
    BlockdevDriver.QCOW2: BlockdevCreateOptionsQcow2,
    BlockdevDriver.SSH: BlockdevCreateOptionsSsh,
    BlockdevDriver.VMDK: BlockdevCreateOptionsVmdk,
}
BlockdevCreateOptions = flat_union(
    "BlockdevCreateOptions",
    "driver",
    {d.value: _CREATE_BRANCHES.get(d) or _no_create_branch(d.value) for d in BlockdevDriver},
)
BlockdevCreateOptionsQcow2.model_rebuild()
BlockdevCreateOptionsSsh.model_rebuild()
BlockdevCreateOptionsVmdk.model_rebuild()


# -- replies ---------------------------------------------------------------------------------
class ImageInfo(QapiModel):
    filename: str
    format: str
    virtual_size: int
    actual_size: int | None = None
    dirty_flag: bool | None = None
    cluster_size: int | None = None
    encrypted: bool | None = None
    compressed: bool | None = None
    backing_filename: str | None = None
    full_backing_filename: str | None = None
    backing_filename_format: str | None = None
    backing_image: ImageInfo | None = None
    format_specific: dict[str, Any] | None = None


class BlockDirtyInfo(QapiModel):
    name: str | None = None
    count: int
    granularity: UInt32
    recording: bool
    busy: bool
    persistent: bool
    inconsistent: bool | None = None


class BlockdevCacheInfo(QapiModel):
    writeback: bool
    direct: bool
    no_flush: bool


class BlockDeviceInfo(QapiModel):
    file: str
    node_name: str | None = None
    ro: bool
    drv: str
    backing_file: str | None = None
    backing_file_depth: int
    encrypted: bool
    detect_zeroes: BlockdevDetectZeroesOptions
    bps: int
    bps_rd: int = Field(alias="bps_rd")
    bps_wr: int = Field(alias="bps_wr")
    iops: int
    iops_rd: int = Field(alias="iops_rd")
    iops_wr: int = Field(alias="iops_wr")
    image: ImageInfo
    cache: BlockdevCacheInfo
    write_threshold: int
    dirty_bitmaps: list[BlockDirtyInfo] | None = None
