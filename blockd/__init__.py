"""blockd: a block-job daemon that speaks QEMU's QMP (qemu-storage-daemon's surface) in Python."""

__version__ = "0.1.0"

#: The QEMU version blockd reports in its greeting and query-version. Management tools gate
#: features on it, and blockd's surface follows qemu-storage-daemon 7.2.
QEMU_COMPAT_VERSION = (7, 2, 0)

__all__ = ["QEMU_COMPAT_VERSION", "__version__"]
