"""The qcow2 format driver package (QEMU's block/qcow2*.c); importing it registers the driver."""

from blockd.block.drivers.qcow2 import driver as driver

__all__ = ["driver"]
