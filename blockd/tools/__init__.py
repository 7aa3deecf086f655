"""Command-line tools that drive a daemon (blockd or qemu-storage-daemon) over QMP."""
