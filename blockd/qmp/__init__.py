"""The QMP monitor: framing, sessions, the command registry, events and introspection."""
