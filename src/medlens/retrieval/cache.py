"""On-disk embedding cache keyed by (content hash, encoder fingerprint, preprocessing).

Why SQLite: one file, transactions make every write all-or-nothing (a killed process
leaves no half-written vector), WAL mode lets readers run while another process writes,
and a busy timeout serialises concurrent writers instead of failing them. Keys are
content hashes (sha256 of the image file bytes, or of the text), never paths or patient
identifiers, so the cache holds nothing that names a person.

Re-indexing or re-evaluating with the same model therefore costs no forward passes:
``medlens index`` looks embeddings up by the file's hash before decoding the image.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

# Bumped when how MedLens turns a file into encoder input changes outside the encoder
# (decoding, orientation, bit depth): part of every key, next to the encoder's own
# preprocessing description.
DECODE_VERSION = "io1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    key TEXT NOT NULL,          -- sha256 of the image file bytes or of the text
    model TEXT NOT NULL,        -- encoder fingerprint
    prep TEXT NOT NULL,         -- preprocessing version (hash)
    kind TEXT NOT NULL,         -- 'image' | 'text'
    dim INTEGER NOT NULL,
    vec BLOB NOT NULL,          -- float32 little-endian, dim values
    created REAL NOT NULL,
    PRIMARY KEY (key, model, prep, kind)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS models (
    model TEXT PRIMARY KEY, name TEXT, dim INTEGER, first_seen REAL
);
"""


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prep_version(encoder: Any) -> str:
    """Short hash of the encoder's preprocessing description + MedLens's decoding."""
    desc = f"{getattr(encoder, 'preprocess_version', '')}|{DECODE_VERSION}"
    return hashlib.sha256(desc.encode()).hexdigest()[:12]


class EmbeddingCache:
    """Vectors by content hash for one process; safe to share the file between processes."""

    def __init__(self, path: Path | str | None = None):
        if path is None:
            from medlens.config import get_settings

            path = get_settings().cache_dir / "embeddings.sqlite3"
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as con:
            con.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
        return con

    # -- lookups ----------------------------------------------------------------------
    def get_many(
        self, keys: Iterable[str], model: str, prep: str, kind: str
    ) -> dict[str, np.ndarray]:
        """The cached vectors among ``keys`` (misses are simply absent)."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, np.ndarray] = {}
        con = self._conn()
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = con.execute(
                f"SELECT key, dim, vec FROM embeddings WHERE model=? AND prep=? AND kind=? "
                f"AND key IN ({marks})",
                (model, prep, kind, *chunk),
            ).fetchall()
            for key, dim, blob in rows:
                vec = np.frombuffer(blob, dtype="<f4")
                if vec.size == dim and np.isfinite(vec).all():  # never trust a bad row
                    out[key] = vec.astype(np.float32)
        return out

    def put_many(
        self,
        items: Mapping[str, np.ndarray],
        model: str,
        prep: str,
        kind: str,
        model_name: str = "",
    ) -> None:
        """Insert in one transaction: all of ``items`` become visible, or none."""
        if not items:
            return
        now = time.time()
        rows = []
        for key, vec in items.items():
            v = np.ascontiguousarray(vec, dtype="<f4").ravel()
            if not np.isfinite(v).all():
                continue
            rows.append((key, model, prep, kind, int(v.size), v.tobytes(), now))
        if not rows:
            return
        con = self._conn()
        con.execute("BEGIN IMMEDIATE")
        try:
            con.executemany("INSERT OR REPLACE INTO embeddings VALUES (?,?,?,?,?,?,?)", rows)
            con.execute(
                "INSERT OR IGNORE INTO models VALUES (?,?,?,?)",
                (model, model_name, rows[0][4], now),
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    # -- maintenance ------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        con = self._conn()
        groups = con.execute(
            "SELECT e.model, COALESCE(m.name, ''), e.kind, COUNT(*), SUM(LENGTH(e.vec)), "
            "MIN(e.created), MAX(e.created) FROM embeddings e LEFT JOIN models m "
            "ON m.model = e.model GROUP BY e.model, e.kind ORDER BY e.model, e.kind"
        ).fetchall()
        size = sum(
            p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file()
        )
        return {
            "path": str(self.path),
            "bytes": size,
            "entries": sum(g[3] for g in groups),
            "groups": [
                {
                    "model": g[0],
                    "name": g[1],
                    "kind": g[2],
                    "entries": g[3],
                    "vector_bytes": g[4],
                    "oldest": g[5],
                    "newest": g[6],
                }
                for g in groups
            ],
        }

    def prune(
        self,
        *,
        keep_models: Iterable[str] | None = None,
        older_than_days: float | None = None,
        everything: bool = False,
    ) -> int:
        """Delete entries: all of them, those of models not in ``keep_models``, and/or
        those older than ``older_than_days``. Returns how many were deleted."""
        where, args = [], []
        if not everything:
            if keep_models is not None:
                keep = list(keep_models)
                where.append(f"model NOT IN ({','.join('?' * len(keep))})" if keep else "1")
                args += keep
            if older_than_days is not None:
                where.append("created < ?")
                args.append(time.time() - float(older_than_days) * 86400)
            if not where:
                return 0
        sql = "DELETE FROM embeddings" + (" WHERE " + " AND ".join(where) if where else "")
        con = self._conn()
        con.execute("BEGIN IMMEDIATE")
        try:
            n = con.execute(sql, args).rowcount
            con.execute(
                "DELETE FROM models WHERE model NOT IN (SELECT DISTINCT model FROM embeddings)"
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("VACUUM")
        return int(n)

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
