"""NBD server and block export models (QEMU's qapi/block-export.json and the legacy
``SocketAddressLegacy`` of qapi/sockets.json).

``nbd-server-start`` takes the *wrapped* legacy address (``{"type": "unix", "data": {...}}``)
while the nbd block driver takes the flat ``SocketAddress``: both shapes are on the wire in QSD
7.2 and clients send each where it belongs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeAlias

from pydantic import field_validator

from blockd.qapi.base import QapiEnum, QapiModel, alternate, flat_union
from blockd.qapi.block import (
    InetSocketAddress,
    NetworkAddressFamily,
    String,
    UnixSocketAddress,
    VsockSocketAddress,
)


# -- SocketAddressLegacy -------------------------------------------------------------------------
class SocketAddressLegacyBase(QapiModel):
    type: NetworkAddressFamily


class InetSocketAddressWrapper(SocketAddressLegacyBase):
    type: Literal[NetworkAddressFamily.INET]
    data: InetSocketAddress


class UnixSocketAddressWrapper(SocketAddressLegacyBase):
    type: Literal[NetworkAddressFamily.UNIX]
    data: UnixSocketAddress


class VsockSocketAddressWrapper(SocketAddressLegacyBase):
    type: Literal[NetworkAddressFamily.VSOCK]
    data: VsockSocketAddress


class StringWrapper(SocketAddressLegacyBase):
    type: Literal[NetworkAddressFamily.FD]
    data: String


if TYPE_CHECKING:
    SocketAddressLegacy: TypeAlias = (
        InetSocketAddressWrapper
        | UnixSocketAddressWrapper
        | VsockSocketAddressWrapper
        | StringWrapper
    )
else:
    SocketAddressLegacy = flat_union(
        "SocketAddressLegacy",
        "type",
        {
            "inet": InetSocketAddressWrapper,
            "unix": UnixSocketAddressWrapper,
            "vsock": VsockSocketAddressWrapper,
            "fd": StringWrapper,
        },
    )


# -- commands ------------------------------------------------------------------------------------
def _uint32(name: str, value: int | None) -> int | None:
    if value is not None and not 0 <= value <= 2**32 - 1:
        raise ValueError(f"Parameter '{name}' expects uint32_t")
    return value


class NbdServerStartArgs(QapiModel):
    addr: SocketAddressLegacy
    tls_creds: str | None = None
    tls_authz: str | None = None
    max_connections: int | None = None

    @field_validator("max_connections")
    @classmethod
    def _max_conn(cls, v: int | None) -> int | None:
        return _uint32("max-connections", v)


class BlockExportType(QapiEnum):
    """Only ``nbd``: blockd has no vhost-user-blk, fuse or vduse exports, and introspection
    says so rather than accepting a type that would fail later."""

    NBD = "nbd"


class BlockExportRemoveMode(QapiEnum):
    SAFE = "safe"
    HARD = "hard"


class BlockDirtyBitmap(QapiModel):
    node: str
    name: str


BlockDirtyBitmapOrStr = alternate(
    "BlockDirtyBitmapOrStr", {"string": str, "object": BlockDirtyBitmap}
)


class BlockExportOptionsBase(QapiModel):
    type: BlockExportType
    id: str
    fixed_iothread: bool | None = None
    iothread: str | None = None
    node_name: str
    writable: bool | None = None
    writethrough: bool | None = None


class BlockExportOptionsNbd(BlockExportOptionsBase):
    type: Literal[BlockExportType.NBD]
    name: str | None = None
    description: str | None = None
    bitmaps: list[BlockDirtyBitmapOrStr] | None = None  # type: ignore[valid-type]
    allocation_depth: bool | None = None


BlockExportOptions = flat_union("BlockExportOptions", "type", {"nbd": BlockExportOptionsNbd})


class NbdServerAddArgs(QapiModel):
    name: str | None = None
    description: str | None = None
    device: str
    writable: bool | None = None
    bitmap: str | None = None


class NbdServerRemoveArgs(QapiModel):
    name: str
    mode: BlockExportRemoveMode | None = None


class BlockExportDelArgs(QapiModel):
    id: str
    mode: BlockExportRemoveMode | None = None


class BlockExportInfo(QapiModel):
    id: str
    type: BlockExportType
    node_name: str
    shutting_down: bool


class BlockExportDeletedEvent(QapiModel):
    id: str
