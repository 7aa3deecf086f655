"""The vmdk format driver package (QEMU's block/vmdk.c); importing it registers the driver."""

from blockd.block.drivers.vmdk import driver as driver

__all__ = ["driver"]
