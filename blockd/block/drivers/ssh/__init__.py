"""The ssh protocol driver package (QEMU's block/ssh.c over asyncssh SFTP): ``hostkey`` decides
host keys as libssh does, ``clientconf`` reads the local user's ssh files, ``session`` is one
connection with its request window, ``driver`` the node. Importing it registers the driver."""

import logging

from blockd.block.drivers.ssh import driver as driver

# asyncssh logs every SFTP request at debug level: that would drown blockd's own debug log
# (and cost a formatted line per piece). Its connection and authentication events are INFO,
# shown when blockd logs at info or debug. Drivers load after the daemon set its log level.
_asyncssh = logging.getLogger("asyncssh")
if _asyncssh.level == logging.NOTSET:
    _asyncssh.setLevel(max(logging.INFO, logging.getLogger().getEffectiveLevel()))

__all__ = ["driver"]
