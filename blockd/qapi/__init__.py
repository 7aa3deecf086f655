"""Pydantic models of blockd's wire contract: the Python counterpart of QEMU's qapi/*.json.

Everything that dispatch, ``query-commands``, ``query-qmp-schema`` and ``schema/`` need comes
from these models, so there is one place where a member is named, typed and made optional.
"""
