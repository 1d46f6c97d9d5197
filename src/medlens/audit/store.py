"""The audit trail: one append-only row per analysis, in SQLite or PostgreSQL.

Why a hash chain as well as database triggers: triggers stop accidental UPDATE/DELETE
through the database, and the chain (each row hashes the previous row's hash) lets
``verify()`` prove afterwards that no row was changed or removed by other means.

What is stored: request id, time, API-key id, model name and fingerprint, MedLens and
knowledge-pack versions, the case-library version, the input's sha256 and the analysis
JSON (which carries no identifiers and never the symptom text). Input bytes and DICOM
identifiers are stored only when the site turns that on (MEDLENS_AUDIT_STORE_INPUTS,
MEDLENS_AUDIT_STORE_IDENTIFIERS).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import (
    Column,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.exc import SQLAlchemyError

from medlens.config import Settings, get_settings
from medlens.errors import ConfigError

TABLE = "medlens_audit"
GENESIS = "0" * 64
_metadata = MetaData()
audit_table = Table(
    TABLE,
    _metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),  # the request id
    Column("created_at", String(40), nullable=False),  # ISO 8601, UTC
    Column("api_key_id", String(64), nullable=False),
    Column("model_name", String(512), nullable=False),
    Column("model_fingerprint", String(64), nullable=False),
    Column("medlens_version", String(32), nullable=False),
    Column("knowledge_version", String(64), nullable=False),
    Column("case_library_version", String(128), nullable=True),
    Column("input_sha256", String(64), nullable=False, index=True),
    Column("input_format", String(16), nullable=False),
    Column("domain", String(32), nullable=False),
    Column("triage_level", String(16), nullable=False),
    Column("top_finding", String(64), nullable=False),
    Column("output", Text, nullable=False),
    Column("input_bytes", LargeBinary, nullable=True),
    Column("identifiers", Text, nullable=True),
    Column("prev_hash", String(64), nullable=False),
    Column("record_hash", String(64), nullable=False),
)

_SQLITE_TRIGGERS = [
    f"CREATE TRIGGER IF NOT EXISTS {TABLE}_no_update BEFORE UPDATE ON {TABLE} "
    "BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END",
    f"CREATE TRIGGER IF NOT EXISTS {TABLE}_no_delete BEFORE DELETE ON {TABLE} "
    "BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END",
]
_PG_TRIGGERS = [
    f"CREATE OR REPLACE FUNCTION {TABLE}_append_only() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END; $$ LANGUAGE plpgsql",
    f"DROP TRIGGER IF EXISTS {TABLE}_no_change ON {TABLE}",
    f"CREATE TRIGGER {TABLE}_no_change BEFORE UPDATE OR DELETE ON {TABLE} "
    f"FOR EACH ROW EXECUTE FUNCTION {TABLE}_append_only()",
    f"DROP TRIGGER IF EXISTS {TABLE}_no_truncate ON {TABLE}",
    f"CREATE TRIGGER {TABLE}_no_truncate BEFORE TRUNCATE ON {TABLE} "
    f"FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_append_only()",
]
_PG_LOCK_KEY = 0x6D65646C656E73  # "medlens": serialises appends across processes

# Fields covered by the hash chain (everything but seq and record_hash itself).
_HASHED = [c.name for c in audit_table.columns if c.name not in ("seq", "record_hash")]


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    id: str
    created_at: str
    api_key_id: str
    model_name: str
    model_fingerprint: str
    medlens_version: str
    knowledge_version: str
    case_library_version: str | None
    input_sha256: str
    input_format: str
    domain: str
    triage_level: str
    top_finding: str
    output: dict[str, Any]
    prev_hash: str
    record_hash: str
    has_input_bytes: bool = False
    identifiers: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _record_hash(row: dict[str, Any]) -> str:
    payload = {}
    for name in _HASHED:
        value = row.get(name)
        if isinstance(value, bytes | bytearray | memoryview):
            value = "sha256:" + hashlib.sha256(bytes(value)).hexdigest()
        payload[name] = value
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _medlens_version() -> str:
    from medlens import __version__

    return __version__


class AuditLog:
    """Append-only audit trail behind one SQLAlchemy engine (thread-safe)."""

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.Lock()
        self.engine = self._make_engine(url)
        try:
            _metadata.create_all(self.engine)
            self._install_triggers()
        except SQLAlchemyError as exc:
            raise ConfigError(f"cannot open the audit database ({self.safe_url}): {exc}") from exc

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> AuditLog:
        return cls((settings or get_settings()).audit_db_url)

    @property
    def safe_url(self) -> str:
        """The URL without its password, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @staticmethod
    def _make_engine(url: str) -> Engine:
        if url.startswith("sqlite"):
            path = url.split(":///", 1)[-1]
            if path and path != ":memory:":
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

            # BEGIN IMMEDIATE: read-the-last-hash-then-insert must hold the write lock, also
            # across processes (the SQLite recipe from the SQLAlchemy docs).
            @event.listens_for(engine, "connect")
            def _connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None
                dbapi_conn.execute("PRAGMA journal_mode=WAL")

            @event.listens_for(engine, "begin")
            def _begin(conn: Any) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

            return engine
        try:
            return create_engine(url, pool_pre_ping=True)
        except (ImportError, SQLAlchemyError) as exc:
            raise ConfigError(
                f"MEDLENS_DB_URL cannot be used: {exc}. For PostgreSQL use "
                "postgresql+psycopg://user:pass@host/db and pip install 'medlens[postgres]'"
            ) from exc

    def _install_triggers(self) -> None:
        statements = {"sqlite": _SQLITE_TRIGGERS, "postgresql": _PG_TRIGGERS}.get(self.dialect)
        if not statements:
            return
        with self.engine.begin() as conn:
            for stmt in statements:
                conn.exec_driver_sql(stmt)

    # -- writing -----------------------------------------------------------------------
    def append(
        self,
        analysis: dict[str, Any],
        *,
        request_id: str,
        api_key_id: str,
        knowledge_version: str,
        case_library_version: str | None = None,
        input_bytes: bytes | None = None,
        identifiers: dict[str, str] | None = None,
    ) -> AuditRecord:
        """Record one analysis (its ``to_dict()`` JSON). Returns the stored record."""
        top = analysis["findings"][0]["id"] if analysis.get("findings") else ""
        row: dict[str, Any] = {
            "id": request_id,
            "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "api_key_id": api_key_id,
            "model_name": analysis["model"]["name"],
            "model_fingerprint": analysis["model"]["fingerprint"],
            "medlens_version": _medlens_version(),
            "knowledge_version": knowledge_version,
            "case_library_version": case_library_version,
            "input_sha256": analysis["input"]["content_hash"],
            "input_format": analysis["input"]["context"]["source_format"],
            "domain": analysis["domain"],
            "triage_level": analysis["triage"]["level"],
            "top_finding": top,
            "output": json.dumps(analysis, sort_keys=True, ensure_ascii=False),
            "input_bytes": input_bytes,
            "identifiers": json.dumps(identifiers, sort_keys=True) if identifiers else None,
        }
        with self._lock, self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            last = conn.execute(
                select(audit_table.c.record_hash).order_by(audit_table.c.seq.desc()).limit(1)
            ).scalar()
            row["prev_hash"] = last or GENESIS
            row["record_hash"] = _record_hash(row)
            seq = conn.execute(audit_table.insert().values(**row)).inserted_primary_key[0]
        return self._to_record({**row, "seq": seq})

    # -- reading -----------------------------------------------------------------------
    def list(self, limit: int = 50, *, newest_first: bool = True) -> list[AuditRecord]:
        order = audit_table.c.seq.desc() if newest_first else audit_table.c.seq.asc()
        with self.engine.connect() as conn:
            rows = conn.execute(select(audit_table).order_by(order).limit(limit)).mappings()
            return [self._to_record(dict(r)) for r in rows]

    def get(self, record_id: str) -> AuditRecord | None:
        """By request id, or by sequence number."""
        cond = audit_table.c.id == record_id
        if record_id.isdigit():
            cond = cond | (audit_table.c.seq == int(record_id))
        with self.engine.connect() as conn:
            row = conn.execute(select(audit_table).where(cond).limit(1)).mappings().first()
        return self._to_record(dict(row)) if row else None

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(audit_table)).scalar() or 0)

    def iter_all(self, batch: int = 500) -> Iterator[dict[str, Any]]:
        """Every row in order, raw (input bytes included), in batches to bound memory."""
        after = 0
        while True:
            with self.engine.connect() as conn:
                rows = [
                    dict(r)
                    for r in conn.execute(
                        select(audit_table)
                        .where(audit_table.c.seq > after)
                        .order_by(audit_table.c.seq)
                        .limit(batch)
                    ).mappings()
                ]
            if not rows:
                return
            yield from rows
            after = rows[-1]["seq"]

    def export_jsonl(self, fh: IO[str], *, include_inputs: bool = False) -> int:
        """Write every row as one JSON line (the chain fields included, so an export can be
        verified elsewhere). Input bytes, when stored, are base64 only on request."""
        n = 0
        for row in self.iter_all():
            rec = self._to_record(row).to_dict()
            if include_inputs and row.get("input_bytes") is not None:
                rec["input_base64"] = base64.b64encode(bytes(row["input_bytes"])).decode()
            fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
        return n

    def verify(self) -> tuple[bool, int, str | None]:
        """Walk the hash chain: (intact, rows checked, id of the first bad row or None)."""
        prev, n = GENESIS, 0
        for row in self.iter_all():
            n += 1
            if row["prev_hash"] != prev or _record_hash(row) != row["record_hash"]:
                return False, n, row["id"]
            prev = row["record_hash"]
        return True, n, None

    @staticmethod
    def _to_record(row: dict[str, Any]) -> AuditRecord:
        return AuditRecord(
            seq=row["seq"],
            id=row["id"],
            created_at=row["created_at"],
            api_key_id=row["api_key_id"],
            model_name=row["model_name"],
            model_fingerprint=row["model_fingerprint"],
            medlens_version=row["medlens_version"],
            knowledge_version=row["knowledge_version"],
            case_library_version=row["case_library_version"],
            input_sha256=row["input_sha256"],
            input_format=row["input_format"],
            domain=row["domain"],
            triage_level=row["triage_level"],
            top_finding=row["top_finding"],
            output=json.loads(row["output"]),
            prev_hash=row["prev_hash"],
            record_hash=row["record_hash"],
            has_input_bytes=row.get("input_bytes") is not None,
            identifiers=json.loads(row["identifiers"]) if row.get("identifiers") else None,
        )

    def close(self) -> None:
        self.engine.dispose()
