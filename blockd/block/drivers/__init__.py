"""Block drivers; every module here registers its driver class on import."""
