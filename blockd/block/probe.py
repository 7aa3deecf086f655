"""Files next to a node's file, and format probing, through the protocol layer (QEMU's
bdrv_get_full_backing_filename, bdrv_dirname and bdrv_probe_all).

A backing file, a vmdk extent or a drive-backup target is named by a string in an image or a
command. Which storage that string refers to is the protocol driver's business: a path next to
a local file, a path on the same ssh host, nothing at all for nbd. Format drivers never call
``open()`` on such a name; they ask the protocol node for the blockdev options of its sibling,
and probe the format by reading through a protocol node. That is what lets the same qcow2 and
vmdk code serve images on local files, ssh and other protocols.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from blockd.block.driver import all_drivers, driver_class
from blockd.errors import QmpError

if TYPE_CHECKING:
    from blockd.block.graph import BlockGraph
    from blockd.block.node import BlockNode

log = logging.getLogger(__name__)

#: What QEMU reads for probing (BLOCK_PROBE_BUF_SIZE).
PROBE_BYTES = 2048
#: Backing chains deeper than this are refused when opened from image headers.
MAX_CHAIN = 64

_opening: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "blockd_opening_chain", default=()
)


def sibling(file_node: BlockNode, name: str) -> tuple[str, dict[str, Any]]:
    """The full name (as ``full-backing-filename`` shows it) and the protocol-level
    blockdev options of *name*, absolute or relative to *file_node*'s file.

    **Raises** QmpError with QEMU's text when the protocol cannot name relative files.
    """
    found = file_node.driver.sibling(name)
    if found is not None:
        return found
    if name.startswith("/"):
        # QEMU opens an absolute name as a local file whatever the image's protocol.
        return name, {"driver": "file", "filename": name}
    raise QmpError(f"Cannot use relative backing file names for '{file_node.filename}'")


@contextmanager
def opening_chain(key: str, what: str) -> Iterator[None]:
    """Guard the recursive open of a chain named in image headers against loops and
    unbounded depth; *key* names the image being opened below (its sibling full name)."""
    chain = _opening.get()
    if key in chain or len(chain) >= MAX_CHAIN:
        raise QmpError(
            f"Could not open backing file: backing chain loops or is too deep at '{what}'"
        )
    token = _opening.set((*chain, key))
    try:
        yield
    finally:
        _opening.reset(token)


def chain_key(file_node: BlockNode) -> str:
    """The identity of *file_node*'s file for loop detection."""
    return file_node.driver.identity()


async def probe_format(graph: BlockGraph, file_options: dict[str, Any]) -> str:
    """The format whose driver claims the first bytes of the file, ``raw`` otherwise.

    The protocol node is opened only for the probe and closed again: its real open reports
    any error with the user's options (QEMU probes on the same open file; opening twice costs
    one extra open, which for local files is nothing).
    """
    from blockd.block.node import BlockNode
    from blockd.qapi.base import ArgsValidator
    from blockd.qapi.block import BlockdevOptions

    try:
        opts = ArgsValidator(BlockdevOptions).validate({**file_options, "read-only": True})
    except QmpError:
        return "raw"
    cls = driver_class(str(file_options.get("driver")))
    if cls is None:
        return "raw"
    node = BlockNode(graph, "#probe", cls)
    node.read_only = True
    try:
        await node.driver.open(opts, graph)
        length = node.driver.getlength()
        buf = bytes(await node.driver.preadv(0, min(PROBE_BYTES, length))) if length else b""
    except (OSError, QmpError) as exc:
        log.debug("probe of %s: %s", file_options, exc)
        return "raw"
    finally:
        try:
            await node.driver.close()
        except Exception:  # pragma: no cover - best effort
            log.debug("close after probe", exc_info=True)
    name = str(file_options.get("filename") or file_options.get("path") or "")
    best, score = "raw", 0
    for drv in all_drivers():
        s = drv.probe(buf, name)
        if s > score:
            best, score = drv.format_name, s
    return best


def full_name(file_node: BlockNode | None, name: str | None) -> str | None:
    """``full-backing-filename`` of a backing file *name* recorded in an image, or None when
    the protocol cannot name it."""
    if not name or file_node is None:
        return None
    try:
        return sibling(file_node, name)[0]
    except QmpError:
        return None


async def open_backing(
    node: BlockNode, graph: BlockGraph, options: Any, name: str | None, fmt: str | None
) -> bool:
    """Attach *node*'s backing child as QEMU's bdrv_open_backing_file does: the ``backing``
    option when given (a node name, inline options, or null for none), else the file *name*
    the image records, next to the image on its protocol, in format *fmt* (probed when
    None). Errors get QEMU's "Could not open backing file: " prefix.

    **Returns** True when ``backing: null`` hides a name the image records.
    """
    from blockd.qapi.base import ArgsValidator
    from blockd.qapi.block import BlockdevOptions

    if "backing" in options.model_fields_set:
        if options.backing is None:
            return True
        await _attach_backing(node, graph, options.backing)
        return False
    file_node = node.file
    if not name or file_node is None:
        return False
    full, file_opts = sibling(file_node, name)
    with opening_chain(chain_key(file_node), full):
        fmt = fmt or await probe_format(graph, file_opts)
        try:
            ref = ArgsValidator(BlockdevOptions).validate({"driver": fmt, "file": file_opts})
        except QmpError:
            raise QmpError(f"Could not open backing file: Unknown driver '{fmt}'") from None
        await _attach_backing(node, graph, ref)
    return False


async def _attach_backing(node: BlockNode, graph: BlockGraph, ref: Any) -> None:
    from blockd.block.perm import ChildRole

    try:
        await graph.open_child(node, ref, "backing", ChildRole.backing(), inherit_read_only=True)
    except QmpError as exc:
        raise QmpError(f"Could not open backing file: {exc.desc}") from None
