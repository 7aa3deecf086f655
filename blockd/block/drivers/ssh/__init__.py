"""The ssh protocol driver package (QEMU's block/ssh.c over asyncssh SFTP): ``hostkey`` decides
host keys as libssh does, ``clientconf`` reads the local user's ssh files, ``session`` is one
connection with its request window, ``driver`` the node. Importing it registers the driver."""

from blockd.block.drivers.ssh import driver as driver

__all__ = ["driver"]
