"""Fixtures of the bitmap/backup/transaction tests (defined in diffsupport)."""

from diffsupport import qmp_session as qmp_session
