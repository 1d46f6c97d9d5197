"""Audit trail of every analysis the service runs (append-only, hash-chained).

>>> from medlens.audit import AuditLog
>>> log = AuditLog.from_settings()      # SQLite under MEDLENS_HOME, or MEDLENS_DB_URL
>>> log.list(limit=10)
"""

from medlens.audit.store import AuditLog, AuditRecord

__all__ = ["AuditLog", "AuditRecord"]
