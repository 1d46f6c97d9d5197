"""One content-addressed cache for every vector MedLens computes from an image or a text.

Prompt ensembles (``analysis.zeroshot``), the case library's image and text vectors
(``retrieval.library``, ``retrieval.knowledge_index``), the lite encoder's backbone
features (training, evaluation, calibration), test-time flip views and evaluation texts
all live in one SQLite file, ``MEDLENS_HOME/cache/embeddings.sqlite3``.

Key: (content, model, kind, view, prep) → one float32 vector.

- ``content``: sha256 hex of the image file's bytes (an array-backed record: of its shape
  and bytes), or of the text (UTF-8). Never a path, a file name or a patient identifier;
  texts never reach the disk, only their hashes do.
- ``model``: the encoder's fingerprint, or for ``features`` the backbone's
  (``LiteEncoder.features_key``): retraining heads on top reuses the features.
- ``kind``: ``image`` (an encoder's embedding), ``features`` (lite backbone features: the
  heads are applied on top at read time) or ``text``.
- ``view``: what the model was shown: ``plain``, ``flip-horizontal``, ``flip-vertical``,
  ``flip-both`` (test-time flips), ``text``.
- ``prep``: short hash of the encoder's preprocessing description and of MedLens's own
  decoding (``DECODE_VERSION``): changing either misses instead of reusing.

Integrity: every row carries a checksum of its whole key and its vector
(``row_checksum``), verified on every read. A row that fails it (bit rot, a truncated or
hand-edited file, vectors moved between keys) or holds a non-finite value is treated as a
miss, so ``fill`` recomputes it and overwrites it: the cache heals itself and a corrupt
entry can never reach a score. (A checksum, not a MAC: it catches corruption; the
cache is a performance aid under MEDLENS_HOME, not a trust boundary.)

Why SQLite: one file; every write is a transaction, so a killed process leaves no half
row; WAL lets readers run while another process writes and a busy timeout serialises
concurrent writers instead of failing them. Lookups and inserts take thousands of keys
at once.

``fill`` is the one cache-fill loop: look all keys up, compute the misses in batches (in
the caller's order, so a cold run makes exactly the batches an uncached run makes and
returns the same numbers), store each batch as it completes (an interrupted run keeps
what it finished), report progress. ``embed_prompt_sets`` adds an in-process memo for the
small prompt sets ``analyze()`` scores against on every call.

``info`` and ``prune`` are the maintenance entry points (``medlens cache info|prune``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from medlens.datasets.manifest import sha256_file
from medlens.errors import MedLensError
from medlens.io.ahead import ahead

log = logging.getLogger("medlens")
T = TypeVar("T")
Progress = Callable[[int], None]

DB_NAME = "embeddings.sqlite3"
# Bumped when how MedLens turns a file into encoder input changes outside the encoder
# (decoding, orientation, bit depth): part of every key through ``prep``.
DECODE_VERSION = "io1"
KINDS = ("image", "features", "text")
# Sub-folders of the cache directory that callers used to pass for the former per-kind
# caches (``cache/prompts``, ``cache/features``, ``cache/embeddings``): they name the same
# one database in their parent.
_LEGACY_DIRS = frozenset({"prompts", "features", "embeddings"})
_CHUNK = 500  # keys per SELECT (well under SQLite's bound-variable limit)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    key TEXT NOT NULL,      -- sha256 hex of the image file bytes / array row / text
    model TEXT NOT NULL,    -- encoder fingerprint (backbone fingerprint for 'features')
    kind TEXT NOT NULL,     -- 'image' | 'features' | 'text'
    view TEXT NOT NULL,     -- 'plain' | 'flip-horizontal' | ... | 'text'
    prep TEXT NOT NULL,     -- hash of preprocessing description + DECODE_VERSION
    dim INTEGER NOT NULL,
    vec BLOB NOT NULL,      -- float32 little-endian, dim values
    created REAL NOT NULL,  -- unix time of the write
    sum TEXT,               -- row checksum (row_checksum): verified on every read
    PRIMARY KEY (key, model, kind, view, prep)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vectors_created ON vectors (created);
CREATE TABLE IF NOT EXISTS models (
    model TEXT PRIMARY KEY, name TEXT, first_seen REAL
);
"""


# -- what a vector means ---------------------------------------------------------------------
@dataclass(frozen=True)
class Space:
    """Everything in a key besides the content hash: which model, kind, view and
    preprocessing produced the vector. ``name`` (the model's human name) is shown by
    ``info`` and is not part of the key."""

    model: str
    kind: str
    view: str = "plain"
    prep: str = ""
    name: str = ""


def prep_version(encoder: Any) -> str:
    """Short hash of the encoder's preprocessing description + MedLens's decoding."""
    desc = f"{getattr(encoder, 'preprocess_version', '')}|{DECODE_VERSION}"
    return hashlib.sha256(desc.encode()).hexdigest()[:12]


def view_name(flip: str | None) -> str:
    """The ``view`` of an image mirrored as ``flip`` names (None: the image as is)."""
    return "plain" if flip is None else f"flip-{flip}"


def image_space(encoder: Any, view: str = "plain") -> Space:
    """The encoder's image embeddings."""
    return Space(encoder.fingerprint, "image", view, prep_version(encoder), encoder.name)


def features_space(encoder: Any, view: str = "plain") -> Space:
    """Lite backbone features, keyed by the backbone (``features_key``), not the heads."""
    name = f"{encoder.name} {getattr(encoder, 'backbone', '')} features".replace("  ", " ")
    return Space(encoder.features_key, "features", view, prep_version(encoder), name)


def text_space(encoder: Any) -> Space:
    """The encoder's text embeddings."""
    return Space(encoder.fingerprint, "text", "text", prep_version(encoder), encoder.name)


# -- content hashes ------------------------------------------------------------------------
_file_hashes: dict[tuple[str, int, int, int], str] = {}
_file_lock = threading.Lock()


def text_key(text: str) -> str:
    """sha256 of a text (the only form in which a text reaches the disk)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_key(path: Path | str) -> str:
    """sha256 of a file's bytes; memoised per (path, inode, size, mtime) in this process,
    so a run hashes each file once and an edited file is hashed again."""
    st = os.stat(path)
    memo = (os.fspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    with _file_lock:
        hit = _file_hashes.get(memo)
    if hit is None:
        hit = sha256_file(Path(path))
        with _file_lock:
            _file_hashes[memo] = hit
    return hit


def array_key(arr: np.ndarray) -> str:
    """sha256 of an array's shape and bytes (array-backed datasets such as MedMNIST)."""
    a = np.ascontiguousarray(arr)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


def record_key(manifest: Any, record: Any) -> str:
    """Content hash of what the model sees for a dataset record: the image file's bytes
    (the same value as ``DecodedImage.content_hash``), an array row's shape and bytes, or
    for a text-only record its text (prefixed, so it never equals a text embedding key)."""
    if record.path is not None:
        return file_key(record.path)
    if manifest.arrays is not None and record.array_index is not None:
        return array_key(manifest.arrays[record.split][record.array_index])
    if record.text:
        return hashlib.sha256(b"text:" + record.text.encode("utf-8")).hexdigest()
    raise MedLensError(f"record {record.id} has no image and no text")


# -- the store ------------------------------------------------------------------------------
class Store:
    """The cache database for one process; safe to share the file between processes
    (and this object between threads: one connection per thread)."""

    def __init__(self, path: Path | str):
        from medlens.config import private_dir, private_file

        self.path = Path(path).expanduser()
        private_dir(self.path.parent)
        private_file(self.path)  # 0600 before SQLite opens it: -wal/-shm inherit the mode
        self._local = threading.local()
        self.rejected = 0  # rows that failed verification on read (and were recomputed)
        self.quarantined: list[Path] = []  # damaged database files moved aside
        self._setup_lock = threading.Lock()
        try:
            self._create()
        except sqlite3.DatabaseError as exc:
            if _locked(exc):
                raise
            self._quarantine(exc)

    def _create(self) -> None:
        con = self._conn()
        con.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    con.execute(stmt)
            _migrate_v1(con)
            _migrate_v2(con)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise

    def _quarantine(self, exc: BaseException) -> None:
        """A database SQLite cannot read (truncated, overwritten) is moved aside, not
        deleted, and an empty one takes its place: the cache heals by recomputing."""
        with self._setup_lock:
            self.close()
            stamp = time.strftime("%Y%m%dT%H%M%S")
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(target) + suffix))
            self.quarantined.append(target)
            from medlens.config import private_file

            private_file(self.path)
            log.warning(
                "embedding cache %s is damaged (%s): moved to %s and started afresh",
                self.path,
                type(exc).__name__,
                target.name,
            )
            self._create()

    def _conn(self) -> sqlite3.Connection:
        # A connection must not cross a fork: a child process opens its own.
        con = getattr(self._local, "con", None)
        if con is None or self._local.pid != os.getpid():
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            con.execute("PRAGMA busy_timeout=60000")
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con, self._local.pid = con, os.getpid()
        return con

    # -- lookups ----------------------------------------------------------------------
    def get_many(self, keys: Iterable[str], space: Space) -> dict[str, np.ndarray]:
        """The cached vectors among ``keys`` whose checksum and values verify; misses,
        and rows that fail verification (counted in ``self.rejected``), are absent, so
        the caller recomputes and overwrites them."""
        try:
            return self._get_many(keys, space)
        except sqlite3.DatabaseError as exc:
            if _locked(exc):
                raise
            self._quarantine(exc)
            return {}

    def _get_many(self, keys: Iterable[str], space: Space) -> dict[str, np.ndarray]:
        keys = list(dict.fromkeys(keys))
        out: dict[str, np.ndarray] = {}
        con = self._conn()
        bad = 0
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = con.execute(
                "SELECT key, dim, vec, sum FROM vectors WHERE model=? AND kind=? AND view=? "
                f"AND prep=? AND key IN ({marks})",
                (space.model, space.kind, space.view, space.prep, *chunk),
            ).fetchall()
            for key, dim, blob, checksum in rows:
                ok = (
                    isinstance(blob, bytes)
                    and checksum == row_checksum(key, space, int(dim), blob)
                    and len(blob) == 4 * int(dim)
                )
                vec = np.frombuffer(blob, dtype="<f4") if ok else None
                if vec is not None and np.isfinite(vec).all():  # never trust a bad row
                    out[key] = vec.astype(np.float32)
                else:
                    bad += 1
        if bad:
            self.rejected += bad
            log.warning(
                "embedding cache: %d row(s) of %s/%s failed verification; recomputing",
                bad,
                space.kind,
                space.view,
            )
        return out

    def put_many(
        self, items: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], space: Space
    ) -> int:
        """Insert in one transaction: all of ``items`` become visible, or none. Vectors
        with a non-finite value are not stored. Returns how many rows were written."""
        now = time.time()
        pairs = items.items() if isinstance(items, Mapping) else items
        rows = []
        for key, vec in pairs:
            v = np.ascontiguousarray(vec, dtype="<f4").ravel()
            if v.size and np.isfinite(v).all():
                blob = v.tobytes()
                rows.append(
                    (
                        key,
                        space.model,
                        space.kind,
                        space.view,
                        space.prep,
                        v.size,
                        blob,
                        now,
                        row_checksum(key, space, v.size, blob),
                    )
                )
        if not rows:
            return 0
        try:
            return self._put_rows(rows, space, now)
        except sqlite3.DatabaseError as exc:
            if _locked(exc):
                raise
            self._quarantine(exc)
            return self._put_rows(rows, space, now)

    def _put_rows(self, rows: list[tuple], space: Space, now: float) -> int:
        con = self._conn()
        con.execute("BEGIN IMMEDIATE")
        try:
            con.executemany(
                "INSERT OR REPLACE INTO vectors "
                "(key, model, kind, view, prep, dim, vec, created, sum) VALUES (?,?,?,?,?,?,?,?,?)",
                rows,
            )
            con.execute(
                "INSERT OR IGNORE INTO models VALUES (?,?,?)", (space.model, space.name, now)
            )
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return len(rows)

    # -- maintenance ------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Rows and bytes per (model, kind, view, prep), and the file's size."""
        groups = (
            self._conn()
            .execute(
                "SELECT v.model, COALESCE(m.name, ''), v.kind, v.view, v.prep, COUNT(*), "
                "SUM(LENGTH(v.vec)), MIN(v.created), MAX(v.created) FROM vectors v "
                "LEFT JOIN models m ON m.model = v.model "
                "GROUP BY v.model, v.kind, v.view, v.prep ORDER BY v.model, v.kind, v.view"
            )
            .fetchall()
        )
        size = sum(
            p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file()
        )
        return {
            "path": str(self.path),
            "bytes": size,
            "entries": sum(g[5] for g in groups),
            "groups": [
                {
                    "model": g[0],
                    "name": g[1],
                    "kind": g[2],
                    "view": g[3],
                    "prep": g[4],
                    "entries": g[5],
                    "vector_bytes": g[6],
                    "oldest": g[7],
                    "newest": g[8],
                }
                for g in groups
            ],
        }

    def prune(
        self,
        *,
        keep_fingerprints: Iterable[str] | None = None,
        older_than: float | None = None,
        model: str | Iterable[str] | None = None,
        kind: str | None = None,
        everything: bool = False,
    ) -> int:
        """Delete rows: every row (``everything``), or those matching *all* the criteria
        given — of a model not in ``keep_fingerprints``, written more than ``older_than``
        days ago, of ``model`` (one fingerprint or several), of ``kind``. No criterion
        deletes nothing. Returns how many rows were deleted."""
        where: list[str] = []
        args: list[Any] = []
        if not everything:
            if keep_fingerprints is not None:
                keep = list(keep_fingerprints)
                where.append(f"model NOT IN ({','.join('?' * len(keep))})" if keep else "1")
                args += keep
            if older_than is not None:
                where.append("created < ?")
                args.append(time.time() - float(older_than) * 86400)
            if model is not None:
                models = [model] if isinstance(model, str) else list(model)
                where.append(f"model IN ({','.join('?' * len(models))})" if models else "0")
                args += models
            if kind is not None:
                where.append("kind = ?")
                args.append(kind)
            if not where:
                return 0
        sql = "DELETE FROM vectors" + (" WHERE " + " AND ".join(where) if where else "")
        con = self._conn()
        con.execute("BEGIN IMMEDIATE")
        try:
            n = con.execute(sql, args).rowcount
            con.execute(
                "DELETE FROM models WHERE model NOT IN (SELECT DISTINCT model FROM vectors)"
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        if n:
            try:  # give the space back; optional (another process may hold the file)
                con.execute("VACUUM")
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:
                pass
        return int(n)

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


def _locked(exc: BaseException) -> bool:
    """SQLite's busy/locked errors: another process holds the file (not damage)."""
    return "locked" in str(exc) or "busy" in str(exc)


def row_checksum(key: str, space: Space, dim: int, blob: bytes) -> str:
    """sha256 (first 16 hex) over the row's whole key and its vector bytes: a vector
    moved to another key, model or view fails it as surely as a flipped bit."""
    h = hashlib.sha256()
    for part in (key, space.model, space.kind, space.view, space.prep, str(dim)):
        h.update(part.encode("utf-8"))
        h.update(b"\x1f")
    h.update(blob)
    return h.hexdigest()[:16]


def _migrate_v2(con: sqlite3.Connection) -> None:
    """Add the checksum column to a cache written before it. Old rows keep a NULL
    checksum, which reads as a miss: they are recomputed (and stamped) on first use
    rather than trusted unchecked."""
    cols = {r[1] for r in con.execute("PRAGMA table_info(vectors)").fetchall()}
    if "sum" not in cols:
        con.execute("ALTER TABLE vectors ADD COLUMN sum TEXT")


def _migrate_v1(con: sqlite3.Connection) -> None:
    """Carry over the retrieval cache's table (same file, keyed (key, model, prep, kind),
    ``prep`` computed as ``prep_version`` is) into ``vectors``, then drop it."""
    cols = {r[1] for r in con.execute("PRAGMA table_info(embeddings)").fetchall()}
    if not {"key", "model", "prep", "kind", "dim", "vec", "created"} <= cols:
        return
    con.execute(
        "INSERT OR IGNORE INTO vectors (key, model, kind, view, prep, dim, vec, created) "
        "SELECT key, model, kind, "
        "CASE kind WHEN 'text' THEN 'text' ELSE 'plain' END, prep, dim, vec, created "
        "FROM embeddings WHERE kind IN ('image', 'text')"
    )
    old = {r[1] for r in con.execute("PRAGMA table_info(models)").fetchall()}
    if "dim" in old:  # the old models table had (model, name, dim, first_seen)
        con.execute("ALTER TABLE models RENAME TO models_v1")
        con.execute("CREATE TABLE models (model TEXT PRIMARY KEY, name TEXT, first_seen REAL)")
        con.execute("INSERT INTO models SELECT model, name, first_seen FROM models_v1")
        con.execute("DROP TABLE models_v1")
    con.execute("DROP TABLE embeddings")


_stores: dict[Path, Store] = {}
_stores_lock = threading.Lock()


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """The folder that holds the database: ``cache_dir``, by default
    ``MEDLENS_HOME/cache``. The former per-kind folders (``<cache>/prompts``,
    ``<cache>/features``, ``<cache>/embeddings``) name their parent, so every caller
    shares the one database."""
    if cache_dir is None:
        from medlens.config import get_settings

        return get_settings().cache_dir
    path = Path(cache_dir).expanduser()
    return path.parent if path.name in _LEGACY_DIRS else path


def open_store(cache_dir: Path | str | None = None) -> Store:
    """The process's ``Store`` for ``cache_root(cache_dir)/embeddings.sqlite3``."""
    path = (cache_root(cache_dir) / DB_NAME).absolute()
    with _stores_lock:
        store = _stores.get(path)
        if store is None or not path.is_file():  # a deleted file is recreated
            store = _stores[path] = Store(path)
    return store


def info(cache_dir: Path | str | None = None) -> dict[str, Any]:
    """Size of the cache and its rows/bytes per model fingerprint, kind and view."""
    return open_store(cache_dir).info()


def prune(cache_dir: Path | str | None = None, **criteria: Any) -> int:
    """Delete cached vectors matching ``criteria`` (the keywords of ``Store.prune``);
    returns how many were deleted."""
    return open_store(cache_dir).prune(**criteria)


# -- the one cache-fill loop ---------------------------------------------------------------
@dataclass
class FillStats:
    """What a ``fill`` call did (accumulates over calls): vectors found, computed."""

    hits: int = 0
    computed: int = 0


def fill(
    items: Sequence[T],
    keys: Sequence[str],
    space: Space,
    compute: Callable[[list[T]], Any],
    *,
    store: Store | None,
    batch_size: int = 64,
    progress: Progress | None = None,
    unique: bool = False,
    dim: int = 0,
    stats: FillStats | None = None,
    prepare: Callable[[list[T]], Any] | None = None,
) -> np.ndarray:
    """Vectors of ``items`` (``keys[i]`` is the content hash of ``items[i]``), in order,
    as one float32 (N, D) array: cached ones from ``store``, the rest from ``compute``.

    ``compute(batch)`` maps a list of items to their (n, D) vectors; it is called on the
    misses in the caller's order, ``batch_size`` at a time, so on a cold cache it makes
    exactly the batches an uncached loop over ``items`` would. With ``prepare`` (e.g.
    decoding), ``compute`` gets ``prepare(batch)`` instead, and the next batch is
    prepared in a background thread while this one computes (``io.ahead``). Each batch
    is stored (one transaction) as soon as it is computed. With ``unique`` a key
    repeated among the misses is computed once. ``progress(n)`` is called as items are
    resolved (hits first), summing to N. ``store=None`` computes everything and stores nothing.
    ``dim`` is the width of the result when ``items`` is empty.
    """
    keys = list(keys)
    if len(keys) != len(items):
        raise ValueError(f"fill: {len(items)} items but {len(keys)} keys")
    got = store.get_many(keys, space) if store is not None and keys else {}
    vecs: list[np.ndarray | None] = [got.get(k) for k in keys]
    miss = [i for i, k in enumerate(keys) if k not in got]
    dupes: list[int] = []
    if unique:
        first: dict[str, int] = {}
        todo = []
        for i in miss:
            if keys[i] in first:
                dupes.append(i)
            else:
                first[keys[i]] = i
                todo.append(i)
        miss = todo
    hits = len(keys) - len(miss) - len(dupes)
    if stats is not None:
        stats.hits += hits
    if progress and hits:
        progress(hits)
    done: dict[str, np.ndarray] = {}
    step = max(1, int(batch_size))
    batches = [miss[s : s + step] for s in range(0, len(miss), step)]
    pick = (lambda idx: prepare([items[i] for i in idx])) if prepare is not None else None
    for idx, ready in ahead(batches, pick):
        out = np.asarray(
            compute(ready if pick is not None else [items[i] for i in idx]), dtype=np.float32
        )
        if out.ndim != 2 or len(out) != len(idx):
            raise ValueError(f"fill: compute returned shape {out.shape} for {len(idx)} items")
        new = [(keys[i], out[j]) for j, i in enumerate(idx)]
        if store is not None:
            store.put_many(new, space)
        for (key, vec), i in zip(new, idx, strict=True):
            vecs[i] = vec
            done[key] = vec
        if stats is not None:
            stats.computed += len(idx)
        if progress:
            progress(len(idx))
    for i in dupes:
        vecs[i] = done[keys[i]]
    if progress and dupes:
        progress(len(dupes))
    if not vecs:
        return np.zeros((0, dim), np.float32)
    width = {v.shape[-1] for v in vecs if v is not None}
    if len(width) != 1:
        raise ValueError(f"fill: vectors of different widths {sorted(width)} for {space}")
    result = np.empty((len(vecs), width.pop()), np.float32)
    for i, v in enumerate(vecs):
        result[i] = v
    return result


# -- uses of the loop -------------------------------------------------------------------------
def embed_texts(
    encoder: Any,
    texts: Sequence[str],
    *,
    store: Store | None,
    batch_size: int = 64,
    progress: Progress | None = None,
    unique: bool = False,
    stats: FillStats | None = None,
) -> np.ndarray:
    """Text embeddings through the cache: ``encoder.embed_texts`` on the misses,
    ``batch_size`` texts per call."""
    return fill(
        list(texts),
        [text_key(t) for t in texts],
        text_space(encoder),
        lambda batch: encoder.embed_texts(list(batch)),
        store=store,
        batch_size=batch_size,
        progress=progress,
        unique=unique,
        dim=int(encoder.dim),
        stats=stats,
    )


_PROMPT_MEMO_SIZE = 256
_prompt_memo: OrderedDict[tuple[str, str, str], np.ndarray] = OrderedDict()
_prompt_lock = threading.Lock()


def embed_prompt_sets(
    encoder: Any, prompt_sets: Sequence[Sequence[str]], store: Store | None
) -> np.ndarray:
    """One ensembled embedding per prompt set (``models.base.ensemble`` of its prompts),
    (n_sets, D) float32. Memoised in this process per (encoder fingerprint, prompts), so
    repeated calls (``analyze`` on every image) never reach SQLite; the prompts' own
    vectors are cached per text in ``store``. All missing prompts are embedded in one
    ``embed_texts`` call, as an uncached call embeds them."""
    from medlens.models.base import ensemble

    sets = [list(s) for s in prompt_sets]
    h = hashlib.sha256()
    for group in sets:
        h.update(b"\x1e".join(t.encode("utf-8") for t in group))
        h.update(b"\x1d")
    memo = (encoder.fingerprint, prep_version(encoder), h.hexdigest())
    with _prompt_lock:
        hit = _prompt_memo.get(memo)
        if hit is not None:
            _prompt_memo.move_to_end(memo)
            return hit
    flat = [t for group in sets for t in group]
    emb = embed_texts(encoder, flat, store=store, batch_size=max(1, len(flat)))
    out, i = [], 0
    for group in sets:
        out.append(ensemble(emb[i : i + len(group)]))
        i += len(group)
    result = np.stack(out).astype(np.float32) if out else np.zeros((0, encoder.dim), np.float32)
    with _prompt_lock:
        _prompt_memo[memo] = result
        while len(_prompt_memo) > _PROMPT_MEMO_SIZE:
            _prompt_memo.popitem(last=False)
    return result


def clear_memo(*, stores: bool = False) -> None:
    """Forget the in-process prompt memo and file hashes (tests, long-lived workers);
    with ``stores``, also close every open database (the next use reopens it)."""
    with _prompt_lock:
        _prompt_memo.clear()
    with _file_lock:
        _file_hashes.clear()
    if stores:
        with _stores_lock:
            for store in _stores.values():
                store.close()
            _stores.clear()


def embed_records(
    encoder: Any,
    manifest: Any,
    records: Sequence[Any],
    *,
    store: Store | None,
    flip: str | None = None,
    batch_size: int = 64,
    forward_batch: int = 32,
    progress: Progress | None = None,
) -> np.ndarray:
    """Vectors of dataset ``records`` (mirrored as ``flip`` names), decoded only on a miss.

    Encoders with a frozen backbone under trained heads (lite: ``image_features``,
    ``embed_from_features``, ``features_key``) get their backbone *features* cached per
    backbone and the heads applied on top, over all records at once, so retraining the
    heads never re-runs the backbone; other encoders get their embeddings cached per
    fingerprint. Returns (N, encoder.dim) embeddings either way.
    """
    from medlens.models.base import flipped

    def pixels(batch: list[Any]) -> list[np.ndarray]:
        ims = [manifest.image(r) for r in batch]
        return ims if flip is None else [flipped(im, flip) for im in ims]

    recs = list(records)
    keys = [record_key(manifest, r) for r in recs]
    view = view_name(flip)
    if is_feature_encoder(encoder):
        import torch

        feats = fill(
            recs,
            keys,
            features_space(encoder, view),
            lambda ims: encoder.image_features(ims, batch_size=forward_batch).numpy(),
            store=store,
            batch_size=batch_size,
            progress=progress,
            prepare=pixels,
        )
        if not recs:
            return np.zeros((0, encoder.dim), np.float32)
        with torch.inference_mode():
            emb, _ = encoder.embed_from_features(img_feats=torch.from_numpy(feats))
        return emb.float().cpu().numpy()
    return fill(
        recs,
        keys,
        image_space(encoder, view),
        lambda ims: encoder.embed_images(ims, batch_size=forward_batch),
        store=store,
        batch_size=batch_size,
        progress=progress,
        dim=int(encoder.dim),
        prepare=pixels,
    )


def record_features(
    encoder: Any,
    manifest: Any,
    records: Sequence[Any],
    *,
    store: Store | None,
    batch_size: int = 64,
    forward_batch: int = 16,
    progress: Progress | None = None,
) -> np.ndarray:
    """Lite backbone features (N, image_dim) of ``records`` through the cache (training)."""
    return fill(
        list(records),
        [record_key(manifest, r) for r in records],
        features_space(encoder),
        lambda ims: encoder.image_features(ims, batch_size=forward_batch).numpy(),
        store=store,
        batch_size=batch_size,
        progress=progress,
        dim=int(encoder.image_dim),
        prepare=lambda b: [manifest.image(r) for r in b],
    )


def is_feature_encoder(encoder: Any) -> bool:
    """Whether ``encoder`` exposes backbone features with heads on top (lite). Asks the
    type: ``features_key`` is a property that may hash the weights."""
    return all(
        hasattr(type(encoder), a) for a in ("image_features", "embed_from_features", "features_key")
    )


def fingerprints_of(encoder: Any) -> list[str]:
    """The cache's model keys for ``encoder``: its fingerprint and, for lite, the backbone
    features key its heads sit on (pruning must keep both)."""
    out = [encoder.fingerprint]
    if is_feature_encoder(encoder):
        out.append(str(encoder.features_key))
    return out
