"""The block graph: nodes, child edges, drivers (QEMU's block.c, block/io.c, block/*.c)."""
