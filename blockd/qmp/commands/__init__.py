"""QMP command handlers, one module per area; each registers its commands on import."""
