"""Sockets for the NBD server and client: name resolution and connecting as QEMU does."""
