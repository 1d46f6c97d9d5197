"""Audit trail of every analysis the service runs (append-only, HMAC-chained, signed head).

>>> from medlens.audit import AuditLog
>>> log = AuditLog.from_settings()      # SQLite under MEDLENS_HOME, or MEDLENS_DB_URL
>>> log.list(limit=10)
"""

from medlens.audit.store import AuditLog, AuditRecord, Verification

__all__ = ["AuditLog", "AuditRecord", "Verification"]
