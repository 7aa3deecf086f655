"""blockd-backup: nightly incremental backups of the disks a storage daemon serves.

The tool is a QMP client only, so it drives blockd and qemu-storage-daemon alike. Modules:
``cli`` (commands and exit codes), ``session`` (short QMP sessions, busy-monitor retry),
``manifest`` (the directory: its state and run marker, chains, points), ``backup`` (a run),
``layers`` (reading the qcow2 files it wrote), ``digest`` (per-chunk hashes, point digests),
``progress``, ``restore``, ``serve``, ``verify``, ``prune`` with ``merge`` (how layers are
merged), ``lock``, ``qemuimg`` and ``testhooks``. See docs/backup-tool.md.
"""
