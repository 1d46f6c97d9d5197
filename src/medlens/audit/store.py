"""The audit trail: one append-only row per analysis, in SQLite or PostgreSQL.

Why a keyed chain and a signed head as well as database triggers: triggers stop
accidental UPDATE/DELETE through the database; the chain (each row's HMAC-SHA256 covers
the previous row's) lets ``verify()`` prove afterwards that no row was changed, inserted
or removed in the middle. The HMAC key is kept apart from the database
(``MEDLENS_AUDIT_KEY``, else a 0600 key file under ``MEDLENS_HOME``), so someone who can
write the database cannot re-hash an edited row. A signed head (row count + last hash,
HMAC'd) is kept twice: in its own table, updated in the same transaction as each append
(so several writers agree), and in a 0600 head file next to the key (so a wiped table or
a deleted database file does not look like a new, empty log). Truncation, middle
deletion, edit with re-hash, wipe, a missing database and a wrong key are all reported by
``verify()`` with the reason. Rows written before the key existed are an "unkeyed legacy
chain". ``head()`` is the record to export to an external anchor (see docs/service.md).

What is stored: request id, time, API-key id, model name and fingerprint, MedLens and
knowledge-pack versions, the case-library version, the input's sha256 and the analysis
JSON (which carries no identifiers and never the symptom text). Input bytes and DICOM
identifiers are stored only when the site turns that on (MEDLENS_AUDIT_STORE_INPUTS,
MEDLENS_AUDIT_STORE_IDENTIFIERS).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
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
HEAD_TABLE = "medlens_audit_head"
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

# The signed head: one row (id 1), rewritten with each append in the same transaction.
head_table = Table(
    HEAD_TABLE,
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("count", Integer, nullable=False),
    Column("last_hash", String(64), nullable=False),
    Column("key_id", String(16), nullable=False),
    Column("mac", String(64), nullable=False),
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


@dataclass(frozen=True)
class Verification:
    """The result of ``AuditLog.verify()``: ``reason`` names the problem when not ``ok``."""

    ok: bool
    checked: int
    bad_id: str | None = None
    reason: str | None = None


def _payload(row: dict[str, Any]) -> bytes:
    payload = {}
    for name in _HASHED:
        value = row.get(name)
        if isinstance(value, bytes | bytearray | memoryview):
            value = "sha256:" + hashlib.sha256(bytes(value)).hexdigest()
        payload[name] = value
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return blob.encode()


def _record_hash(row: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 of the row's chained fields (the previous row's hash among them)."""
    return hmac.new(key, _payload(row), hashlib.sha256).hexdigest()


def _legacy_hash(row: dict[str, Any]) -> str:
    """The unkeyed SHA-256 older versions wrote (only to recognise a legacy chain)."""
    return hashlib.sha256(_payload(row)).hexdigest()


def _key_id(key: bytes) -> str:
    return hmac.new(key, b"medlens-audit-key-id", hashlib.sha256).hexdigest()[:16]


def _head_mac(key: bytes, count: int, last_hash: str) -> str:
    msg = f"medlens-audit-head-v1|{count}|{last_hash}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def audit_key(settings: Settings) -> bytes:
    """MEDLENS_AUDIT_KEY, else the key file under MEDLENS_HOME (created 0600 on first use)."""
    if settings.audit_key:
        return settings.audit_key.encode()
    path = settings.audit_key_file
    try:
        raw = path.read_text().strip()
    except FileNotFoundError:
        from medlens.config import ensure_home

        if path.parent == settings.home:
            ensure_home(settings)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        new = secrets.token_hex(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: wait for its write
            for _ in range(50):
                raw = path.read_text().strip()
                if raw:
                    break
                time.sleep(0.02)
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(new + "\n")
            raw = new
    except OSError as exc:
        raise ConfigError(f"cannot read the audit key file {path}: {exc.strerror}") from exc
    if len(raw) < 32:
        raise ConfigError(
            f"the audit key file {path} is empty or too short; restore it from backup "
            "(a new key cannot verify the existing trail)"
        )
    return raw.encode()


def _medlens_version() -> str:
    from medlens import __version__

    return __version__


class AuditLog:
    """Append-only audit trail behind one SQLAlchemy engine (thread-safe)."""

    def __init__(self, url: str, *, settings: Settings | None = None, key: bytes | None = None):
        """``key`` defaults to ``audit_key(settings)``; the head file lives in the key's
        folder (``settings.home``), one per database URL."""
        settings = settings or get_settings()
        self.url = url
        self._lock = threading.Lock()
        self._key = key if key is not None else audit_key(settings)
        self.key_id = _key_id(self._key)
        self.engine = self._make_engine(url)
        self.missing_at_open = self._sqlite_missing(url)
        self._make_private(url, settings)
        tag = hashlib.sha256(self.safe_url.encode()).hexdigest()[:16]
        self.head_file = settings.home / f"audit-head-{tag}.json"
        try:
            _metadata.create_all(self.engine)
            self._install_triggers()
        except SQLAlchemyError as exc:
            raise ConfigError(f"cannot open the audit database ({self.safe_url}): {exc}") from exc

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> AuditLog:
        settings = settings or get_settings()
        return cls(settings.audit_db_url, settings=settings)

    @staticmethod
    def _make_private(url: str, settings: Settings) -> None:
        """A SQLite trail is owner-only: MEDLENS_HOME 0700 and the file 0600 before SQLite
        first opens it (its -wal and -shm files copy the database file's mode)."""
        from medlens.config import ensure_home, private_file

        if not url.startswith("sqlite"):
            return
        raw = url.split(":///", 1)[-1]
        if not raw or raw == ":memory:":
            return
        path = Path(raw).expanduser()
        if path.parent == settings.home:
            ensure_home(settings)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for f in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if f == path or f.exists():
                private_file(f)

    @staticmethod
    def _sqlite_missing(url: str) -> bool:
        if not url.startswith("sqlite"):
            return False
        path = url.split(":///", 1)[-1]
        return bool(path) and path != ":memory:" and not Path(path).expanduser().exists()

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
        with self._lock:
            seq, signed = self._insert(row)
            self._write_head_file(signed)  # under the lock: one writer of the file per process
        return self._to_record({**row, "seq": seq})

    def _insert(self, row: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Chain, insert and re-sign the head in one transaction (serialised across
        processes: SQLite BEGIN IMMEDIATE, a PostgreSQL advisory lock)."""
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            last = conn.execute(
                select(audit_table.c.record_hash).order_by(audit_table.c.seq.desc()).limit(1)
            ).scalar()
            head = conn.execute(select(head_table.c.count).where(head_table.c.id == 1)).scalar()
            if head is None:  # first keyed append (an empty or a legacy table)
                head = conn.execute(select(func.count()).select_from(audit_table)).scalar()
            row["prev_hash"] = last or GENESIS
            row["record_hash"] = _record_hash(row, self._key)
            seq = conn.execute(audit_table.insert().values(**row)).inserted_primary_key[0]
            count = int(head or 0) + 1
            signed = {
                "count": count,
                "last_hash": row["record_hash"],
                "key_id": self.key_id,
                "mac": _head_mac(self._key, count, row["record_hash"]),
            }
            done = conn.execute(head_table.update().where(head_table.c.id == 1).values(**signed))
            if done.rowcount == 0:
                conn.execute(head_table.insert().values(id=1, **signed))
        return seq, signed

    # -- the signed head ---------------------------------------------------------------
    def head(self) -> dict[str, Any]:
        """The signed head as stored in the database (count, last hash, key id, HMAC), with
        the time: the record to append to an external anchor (``audit verify --export-head``)."""
        with self.engine.connect() as conn:
            got = conn.execute(select(head_table).where(head_table.c.id == 1)).mappings().first()
        head = dict(got) if got else {"count": 0, "last_hash": GENESIS, "key_id": self.key_id}
        head.pop("id", None)
        head.setdefault("mac", _head_mac(self._key, 0, GENESIS))
        return {"at": datetime.now(UTC).isoformat(timespec="seconds"), **head}

    def _read_head_file(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.head_file.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _write_head_file(self, signed: dict[str, Any]) -> None:
        """Keep the head file at the newest head this host wrote (never move it back; a
        concurrent writer may have written a later one already)."""
        current = self._read_head_file() or {}
        if isinstance(current.get("count"), int) and current["count"] >= signed["count"]:
            return
        self.head_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.head_file.with_name(
            f".{self.head_file.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        )
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"url": self.safe_url, **signed}, sort_keys=True) + "\n")
        os.replace(tmp, self.head_file)

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

    def verify(self) -> Verification:
        """Walk the HMAC chain and check it against both signed heads; the first problem
        found is the ``reason``. A check that raced with an append (the head moved while
        the rows were read) is repeated, up to three times."""
        for _ in range(3):
            before = self._db_head()
            result = self._verify_once(before)
            if result.ok or self._db_head() == before:
                return result
        return result

    def _db_head(self) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            got = conn.execute(select(head_table).where(head_table.c.id == 1)).mappings().first()
        return dict(got) if got else None

    def _verify_once(self, db_head: dict[str, Any] | None) -> Verification:
        file_head = self._read_head_file()
        if db_head is not None and db_head["key_id"] != self.key_id:
            return Verification(
                False, 0, None,
                "the audit key is not the one this trail was written with "
                "(check MEDLENS_AUDIT_KEY or the key file)",
            )  # fmt: skip
        anchor_at = file_head.get("count") if isinstance(file_head, dict) else None
        prev, n, anchor = GENESIS, 0, None
        for row in self.iter_all():
            n += 1
            if row["record_hash"] != _record_hash(row, self._key):
                if n == 1 and db_head is None and row["record_hash"] == _legacy_hash(row):
                    return Verification(
                        False, n, row["id"],
                        "unkeyed legacy chain: these records were written before keyed "
                        "auditing; export them (medlens audit export) and start a new database",
                    )  # fmt: skip
                return Verification(
                    False, n, row["id"],
                    f"record {row['id']} does not match its HMAC: it was altered "
                    "(re-hashing without the key does not help)",
                )  # fmt: skip
            if row["prev_hash"] != prev:
                return Verification(
                    False, n, row["id"],
                    f"record {row['id']} does not follow the record before it: "
                    "records were deleted or inserted",
                )  # fmt: skip
            prev = row["record_hash"]
            if n == anchor_at:
                anchor = prev
        return self._check_heads(n, prev, anchor, db_head, file_head)

    def _check_heads(
        self,
        n: int,
        last: str,
        anchor: str | None,
        db_head: dict[str, Any] | None,
        file_head: dict[str, Any] | None,
    ) -> Verification:
        def broken(reason: str) -> Verification:
            return Verification(False, n, None, reason)

        if db_head is None:
            if n:
                return broken(f"the signed head record is missing while {n} records remain")
        elif db_head["mac"] != _head_mac(self._key, db_head["count"], db_head["last_hash"]):
            return broken("the signed head record does not verify: it was altered")
        elif db_head["count"] != n or db_head["last_hash"] != last:
            return broken(
                f"the database holds {n} records but its signed head says {db_head['count']}: "
                "records were removed from the end"
            )
        if file_head is None:
            if n:
                return broken(f"the head file {self.head_file} is missing")
            return Verification(True, 0)
        count, mac = file_head.get("count"), file_head.get("mac")
        lhash = file_head.get("last_hash")
        if not isinstance(count, int) or mac != _head_mac(self._key, count, str(lhash)):
            return broken(f"the head file {self.head_file} does not verify")
        if count > n:
            if self.missing_at_open:
                return broken(f"the audit database was missing; the head file says {count} records")
            if n == 0:
                return broken(
                    "the audit database is empty (wiped, or deleted and re-created) but the "
                    f"head file says {count} records"
                )
            return broken(
                f"the head file says {count} records, the database holds {n}: "
                "records were deleted or the table wiped"
            )
        if count and anchor != lhash:
            return broken(f"record #{count} is not the one the head file signed: log rewritten")
        return Verification(True, n)

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
