"""NBD: the server that backs ``block-export-add type=nbd`` and the client protocol used by the
``nbd`` block driver (QEMU's nbd/ directory, block/export/ and block/nbd.c)."""
