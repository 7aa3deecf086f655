"""The stress run's parts: the shadow record (model), the clients, backups, and the checks."""
