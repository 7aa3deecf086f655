"""blockd-backup: nightly incremental backups of the disks a storage daemon serves.

The tool is a QMP client only, so it drives blockd and qemu-storage-daemon alike. Modules:
``cli`` (commands and exit codes), ``session`` (short QMP sessions, busy-monitor retry),
``state``/``manifest`` (the directory: chains, points, the run marker), ``layers`` (reading
the qcow2 files it wrote), ``digest`` (per-chunk hashes and point digests), ``progress``,
``backup`` (a run), ``restore``, ``serve``, ``prune`` (with ``merge``: how layers are merged),
``verify`` and ``lock``. See docs/backup-tool.md.
"""
