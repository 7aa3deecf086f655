"""The block-copy engine shared by backup (and later mirror, stream and commit)."""
