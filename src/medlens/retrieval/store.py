"""One small vector-store interface over Qdrant, with two backends.

- ``EdgeStore`` (default): the Qdrant engine in-process through ``qdrant-edge-py``. Nothing
  to start; one shard folder per collection under ``MEDLENS_HOME/qdrant``; HNSW and
  payload indexes, so a filtered top-10 at 100k vectors takes about a millisecond
  (``benchmarks/vector_search.py``). Chosen over ``qdrant-client``'s local mode, which
  scores every point in Python (tens of ms at 10k, refuses to scale past ~20k).
- ``ServerStore``: ``qdrant-client`` against a Qdrant server or cluster
  (``MEDLENS_QDRANT_URL`` + optional ``MEDLENS_QDRANT_API_KEY``); collections are created
  with ``shard_number`` / ``replication_factor`` so a cluster spreads them. The same class
  runs against ``qdrant-client``'s local mode (``location=":memory:"`` or a path), which is
  how it is tested here: same client calls, no server binary needed.

Filters are plain data (``Condition``) turned into each backend's filter objects, so
callers never import Qdrant types.
"""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from medlens.errors import ConfigError

# Payload fields that get an index (and so can be filtered fast), by type.
KEYWORD_FIELDS = ("domain", "labels", "findings", "dataset", "split", "sex", "view", "finding_id")
FLOAT_FIELDS = ("age",)
# Fields whose values get their own extra HNSW links (Qdrant's payload-aware graph), so a
# selective filter on them keeps recall. Every other indexed field is filtered through the
# main graph (ACORN for selective combinations): extra graphs for near-constant fields
# (domain is fixed per collection, split, sex) or numeric ranges (age) multiplied the
# 1M-point build time several-fold for no recall (benchmarks/vector_search.py).
HNSW_FIELDS = frozenset({"labels", "findings", "finding_id"})
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
OPS = ("eq", "in", "gte", "gt", "lte", "lt")


@dataclass(frozen=True)
class Condition:
    """One filter condition: ``key op value``. ``eq`` on a list field matches any element."""

    key: str
    op: str
    value: Any

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ConfigError(f"filter operator {self.op!r} is not one of {', '.join(OPS)}")


# Accepted spellings in --filter; the first two-character operators must be tried first.
_FILTER_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(>=|<=|!=|=|>|<)\s*(.+?)\s*$")
_OP_NAMES = {">=": "gte", "<=": "lte", ">": "gt", "<": "lt", "=": "eq"}
# Friendly aliases: "label=mel" means the payload field "labels".
FIELD_ALIASES = {"label": "labels", "finding": "findings", "gender": "sex"}


def parse_filter(text: str) -> Condition:
    """``label=mel``, ``labels=mel,bcc`` (any of), ``age>=40``, ``sex=F``, ``view=PA``."""
    m = _FILTER_RE.match(text)
    if not m or m.group(2) == "!=":
        raise ConfigError(
            f"filter {text!r} is not FIELD=VALUE, FIELD=A,B or FIELD>=NUMBER "
            "(operators: = >= > <= <), e.g. label=mel or age>=40"
        )
    key, op, raw = m.group(1), _OP_NAMES[m.group(2)], m.group(3)
    key = FIELD_ALIASES.get(key, key)
    if op != "eq":
        try:
            return Condition(key, op, float(raw))
        except ValueError:
            raise ConfigError(f"filter {text!r}: {raw!r} is not a number") from None
    if key == "sex":
        raw = raw.upper()[:1]
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if len(values) > 1:
        return Condition(key, "in", values)
    if key in FLOAT_FIELDS:
        return Condition(key, "eq", float(values[0]))
    return Condition(key, "eq", values[0])


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class PointData:
    """A point to write: named vectors (a missing name = no such vector) and a payload."""

    id: str
    vectors: dict[str, np.ndarray]
    payload: dict[str, Any]


class VectorStore(Protocol):
    backend: str

    def exists(self, name: str) -> bool: ...
    def create(self, name: str, vectors: Mapping[str, int]) -> None: ...
    def drop(self, name: str) -> None: ...
    def collections(self) -> list[str]: ...
    def upsert(self, name: str, points: Sequence[PointData]) -> None: ...
    def present(self, name: str, ids: Sequence[str]) -> set[str]: ...
    def count(self, name: str) -> int: ...
    def search(
        self,
        name: str,
        vector: np.ndarray,
        using: str,
        k: int = 10,
        filters: Sequence[Condition] = (),
        exact: bool = False,
        ef: int | None = None,
    ) -> list[Hit]: ...
    def scroll(self, name: str, with_vectors: bool = False) -> Iterator[PointData]: ...
    def optimize(self, name: str) -> None: ...
    def flush(self, name: str) -> None: ...


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(f"collection name {name!r} may use only letters, digits, - and _")
    return name


# ----------------------------------------------------------------------------- embedded


@dataclass(frozen=True)
class IndexSettings:
    """How a collection is indexed and searched: HNSW graph (``m``, ``ef_construct``),
    beam width at search time (``search_ef``) and optional int8 scalar quantization
    (vectors scored in int8 from RAM, the best ``oversampling`` × k candidates re-scored
    with the float32 originals). Chosen by measurement: ``benchmarks/vector_search.py``,
    results in docs/retrieval.md. Collections keep the graph they were built with; the
    search parameters apply to every search."""

    m: int = 16
    ef_construct: int = 128
    search_ef: int = 256
    filtered_ef: int | None = None  # beam width when a filter is given (None: search_ef)
    quantization: str | None = None  # None | "int8"
    quantile: float = 0.99
    oversampling: float = 2.0
    rescore: bool = True
    acorn: bool = True  # filtered search also walks 2-hop neighbours (ACORN)

    def __post_init__(self) -> None:
        if self.quantization not in (None, "int8"):
            raise ConfigError(f"quantization must be None or 'int8', not {self.quantization!r}")
        beams = (self.search_ef, self.search_ef if self.filtered_ef is None else self.filtered_ef)
        if min(self.m, self.ef_construct, *beams) < 1 or self.oversampling < 1:
            raise ConfigError(f"invalid index settings: {self}")

    def ef(self, filtered: bool, override: int | None = None) -> int:
        """Beam width of one search: ACORN's two-hop walk finds filtered neighbours with
        a narrower beam than an unfiltered search needs, so the two can differ."""
        if override:
            return int(override)
        return int(self.filtered_ef or self.search_ef) if filtered else int(self.search_ef)


# The settings of MedLens <= 2026-12-06 (the 1M benchmark's "old" rows) and today's
# default, chosen on validation-split queries (docs/retrieval.md, "A million cases"):
# float32 vectors, m 16, ef_construct 128, ef 256, and a beam of 96 for filtered
# searches. ACORN's two-hop walk keeps filtered recall with a narrower beam: at 1M, of
# the candidates 48 / 64 / 96, the highest validation recall at p50 <= 3 ms (0.983 at
# 2.2 ms; ef 256 gave 0.99-1.00 at 2.9-5.7 ms across runs). int8 scalar quantization
# (the best 2 x k re-scored in float32) built the graph 2.3x faster but lost recall on
# the 200k validation run (filtered 0.992 vs 1.000, unfiltered 0.984 vs 0.995): an
# option for memory-bound libraries, not the default.
LEGACY_INDEX = IndexSettings()
DEFAULT_INDEX = IndexSettings(filtered_ef=96)
INT8_INDEX = replace(DEFAULT_INDEX, quantization="int8")


class EdgeStore:
    """Qdrant Edge shards in-process, one folder per collection under ``root``.

    A shard folder can be open in one process at a time (Qdrant locks its WAL); a second
    process gets a clear error telling it to use a Qdrant server for shared access.
    """

    backend = "embedded"
    SEARCH_THREADS = 1

    _open: ClassVar[dict[Path, Any]] = {}  # process-wide: a shard may be loaded only once
    _lock = threading.Lock()

    def __init__(self, root: Path | str, index: IndexSettings = DEFAULT_INDEX):
        self.root = Path(root).expanduser()
        self.index = index

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def _shard(self, name: str) -> Any:
        from qdrant_edge import EdgeShard

        path = self._path(name)
        with self._lock:
            shard = self._open.get(path)
            if shard is not None:
                return shard
            if not (path / "edge_config.json").is_file():
                raise ConfigError(f"no collection {name!r} in {self.root}")
            try:
                shard = EdgeShard.load(str(path))
            except Exception as exc:
                raise _open_error(path, exc) from exc
            self._open[path] = shard
            return shard

    def exists(self, name: str) -> bool:
        return (self._path(name) / "edge_config.json").is_file()

    def create(self, name: str, vectors: Mapping[str, int]) -> None:
        import qdrant_edge as qe

        path = self._path(name)
        if self.exists(name):
            return
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # vectors stay private
        cfg = qe.EdgeConfig(
            vectors={
                v: qe.EdgeVectorParams(size=int(dim), distance=qe.Distance.Cosine)
                for v, dim in vectors.items()
            },
            hnsw_config=qe.HnswIndexConfig(
                m=self.index.m, ef_construct=self.index.ef_construct, full_scan_threshold=10_000
            ),
            quantization_config=(
                qe.ScalarQuantizationConfig(
                    qe.ScalarType.Int8, quantile=self.index.quantile, always_ram=True
                )
                if self.index.quantization == "int8"
                else None
            ),
            # One query is small work: a thread pool per query costs more than it saves.
            max_search_threads=self.SEARCH_THREADS,
            # Payload in the page cache, not read from disk per hit (~1.4 ms of a query).
            payload_memory=qe.Memory.Cached,
        )
        with self._lock:
            try:
                shard = qe.EdgeShard.create(str(path), cfg)
            except Exception as exc:
                raise _open_error(path, exc) from exc
            self._open[path] = shard
        for f in KEYWORD_FIELDS:
            params = qe.KeywordIndexParams(enable_hnsw=f in HNSW_FIELDS)
            shard.update(qe.UpdateOperation.create_field_index(f, params))
        for f in FLOAT_FIELDS:
            params = qe.FloatIndexParams(enable_hnsw=f in HNSW_FIELDS)
            shard.update(qe.UpdateOperation.create_field_index(f, params))
        shard.flush()

    def drop(self, name: str) -> None:
        import shutil

        path = self._path(name)
        with self._lock:
            shard = self._open.pop(path, None)
        if shard is not None:
            shard.close()
        shutil.rmtree(path, ignore_errors=True)

    def collections(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "edge_config.json").is_file())

    def upsert(self, name: str, points: Sequence[PointData]) -> None:
        import qdrant_edge as qe

        if not points:
            return
        pts = [
            qe.Point(
                p.id,
                {k: np.asarray(v, np.float32).tolist() for k, v in p.vectors.items()},
                _clean_payload(p.payload),
            )
            for p in points
        ]
        self._shard(name).update(qe.UpdateOperation.upsert_points(pts))

    def present(self, name: str, ids: Sequence[str]) -> set[str]:
        shard = self._shard(name)
        found: set[str] = set()
        for i in range(0, len(ids), 1000):
            recs = shard.retrieve(list(ids[i : i + 1000]), with_payload=False, with_vector=False)
            found.update(str(r.id) for r in recs)
        return found

    def count(self, name: str) -> int:
        import qdrant_edge as qe

        return int(self._shard(name).count(qe.CountRequest(exact=True)))

    def search(
        self,
        name: str,
        vector: np.ndarray,
        using: str,
        k: int = 10,
        filters: Sequence[Condition] = (),
        exact: bool = False,
        ef: int | None = None,
    ) -> list[Hit]:
        import qdrant_edge as qe

        req = qe.QueryRequest(
            limit=int(k),
            query=qe.Query.Nearest(np.asarray(vector, np.float32).ravel().tolist(), using=using),
            filter=_edge_filter(filters),
            with_payload=True,
            params=qe.SearchParams(
                hnsw_ef=self.index.ef(bool(filters), ef),
                exact=exact,
                acorn=qe.AcornSearchParams(enable=self.index.acorn),
                quantization=qe.QuantizationSearchParams(
                    rescore=self.index.rescore, oversampling=self.index.oversampling
                ),
            ),
        )
        return [
            Hit(str(p.id), float(p.score), dict(p.payload or {}))
            for p in self._shard(name).query(req)
        ]

    def scroll(self, name: str, with_vectors: bool = False) -> Iterator[PointData]:
        import qdrant_edge as qe

        shard = self._shard(name)
        offset = None
        while True:
            recs, offset = shard.scroll(
                qe.ScrollRequest(
                    offset=offset, limit=512, with_payload=True, with_vector=with_vectors
                )
            )
            for r in recs:
                vec = r.vector if isinstance(r.vector, dict) else {}
                yield PointData(
                    str(r.id),
                    {k: np.asarray(v, np.float32) for k, v in vec.items()},
                    dict(r.payload or {}),
                )
            if offset is None:
                return

    def optimize(self, name: str) -> None:
        """Build HNSW / merge segments now (Edge runs optimizers only when asked)."""
        shard = self._shard(name)
        shard.optimize()
        shard.flush()

    def flush(self, name: str) -> None:
        self._shard(name).flush()

    def close(self) -> None:
        with self._lock:
            mine = [p for p in self._open if self.root in p.parents]
            for p in mine:
                self._open.pop(p).close()


def _open_error(path: Path, exc: Exception) -> ConfigError:
    msg = str(exc)
    if "WouldBlock" in msg or "lock" in msg.lower():
        return ConfigError(
            f"the vector collection {path.name} is open in another MedLens process; "
            "close it, or set MEDLENS_QDRANT_URL to share a Qdrant server between processes"
        )
    return ConfigError(f"cannot open the vector collection at {path}: {msg.splitlines()[0]}")


def _clean_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-safe payload: tuples to lists, numpy scalars to Python, None dropped."""
    out: dict[str, Any] = {}
    for k, v in payload.items():
        if v is None:
            continue
        if isinstance(v, tuple | list):
            out[k] = [x.item() if isinstance(x, np.generic) else x for x in v]
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def _edge_filter(filters: Sequence[Condition]) -> Any:
    import qdrant_edge as qe

    if not filters:
        return None
    must = []
    for c in filters:
        if c.op == "eq" and isinstance(c.value, float):  # float equality: a closed range
            must.append(qe.FieldCondition(key=c.key, range=qe.RangeFloat(gte=c.value, lte=c.value)))
        elif c.op == "eq":
            must.append(qe.FieldCondition(key=c.key, match=qe.MatchValue(c.value)))
        elif c.op == "in":
            must.append(qe.FieldCondition(key=c.key, match=qe.MatchAny([str(v) for v in c.value])))
        else:
            must.append(qe.FieldCondition(key=c.key, range=qe.RangeFloat(**{c.op: float(c.value)})))
    return qe.Filter(must=must)


# ----------------------------------------------------------------------------- server


class ServerStore:
    """A Qdrant server or cluster through ``qdrant-client`` (or its local mode in tests)."""

    backend = "server"

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        location: str | None = None,
        path: Path | str | None = None,
        shards: int = 2,
        replicas: int = 1,
        timeout: int = 30,
        index: IndexSettings = DEFAULT_INDEX,
    ):
        from qdrant_client import QdrantClient

        if url:
            self.client = QdrantClient(url=url, api_key=api_key, timeout=timeout)
        elif path is not None:
            self.client = QdrantClient(path=str(path))
        else:
            self.client = QdrantClient(location=location or ":memory:")
        self.shards, self.replicas = int(shards), int(replicas)
        self.index = index
        self.url = url
        if not url:  # local mode ignores payload indexes and search params, and says so
            warnings.filterwarnings(
                "ignore",
                message="(Payload indexes|Local mode)",
                category=UserWarning,
                module="qdrant_client",
            )

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """Local mode (tests) ignores payload indexes and search params, and warns so."""
        if self.url:
            yield
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield

    def exists(self, name: str) -> bool:
        return bool(self.client.collection_exists(check_name(name)))

    def create(self, name: str, vectors: Mapping[str, int]) -> None:
        from qdrant_client import models as m

        if self.exists(name):
            return
        self.client.create_collection(
            collection_name=name,
            vectors_config={
                v: m.VectorParams(size=int(d), distance=m.Distance.COSINE)
                for v, d in vectors.items()
            },
            shard_number=self.shards,
            replication_factor=self.replicas,
            hnsw_config=m.HnswConfigDiff(m=self.index.m, ef_construct=self.index.ef_construct),
            quantization_config=(
                m.ScalarQuantization(
                    scalar=m.ScalarQuantizationConfig(
                        type=m.ScalarType.INT8, quantile=self.index.quantile, always_ram=True
                    )
                )
                if self.index.quantization == "int8"
                else None
            ),
        )
        with self._quiet():
            for f in KEYWORD_FIELDS:
                schema = m.KeywordIndexParams(type="keyword", enable_hnsw=f in HNSW_FIELDS)
                self.client.create_payload_index(name, f, schema)
            for f in FLOAT_FIELDS:
                schema = m.FloatIndexParams(type="float", enable_hnsw=f in HNSW_FIELDS)
                self.client.create_payload_index(name, f, schema)

    def drop(self, name: str) -> None:
        if self.exists(name):
            self.client.delete_collection(name)

    def collections(self) -> list[str]:
        return sorted(c.name for c in self.client.get_collections().collections)

    def upsert(self, name: str, points: Sequence[PointData]) -> None:
        from qdrant_client import models as m

        if not points:
            return
        self.client.upsert(
            collection_name=name,
            points=[
                m.PointStruct(
                    id=p.id,
                    vector={k: np.asarray(v, np.float32).tolist() for k, v in p.vectors.items()},
                    payload=_clean_payload(p.payload),
                )
                for p in points
            ],
            wait=True,
        )

    def present(self, name: str, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(ids), 1000):
            recs = self.client.retrieve(
                name, list(ids[i : i + 1000]), with_payload=False, with_vectors=False
            )
            found.update(str(r.id) for r in recs)
        return found

    def count(self, name: str) -> int:
        return int(self.client.count(name, exact=True).count)

    def search(
        self,
        name: str,
        vector: np.ndarray,
        using: str,
        k: int = 10,
        filters: Sequence[Condition] = (),
        exact: bool = False,
        ef: int | None = None,
    ) -> list[Hit]:
        from qdrant_client import models as m

        with self._quiet():
            res = self.client.query_points(
                collection_name=name,
                query=np.asarray(vector, np.float32).ravel().tolist(),
                using=using,
                limit=int(k),
                query_filter=_client_filter(filters),
                with_payload=True,
                search_params=m.SearchParams(
                    hnsw_ef=self.index.ef(bool(filters), ef),
                    exact=exact,
                    acorn=m.AcornSearchParams(enable=self.index.acorn),
                    quantization=m.QuantizationSearchParams(
                        rescore=self.index.rescore, oversampling=self.index.oversampling
                    ),
                ),
            )
        return [Hit(str(p.id), float(p.score), dict(p.payload or {})) for p in res.points]

    def scroll(self, name: str, with_vectors: bool = False) -> Iterator[PointData]:
        offset = None
        while True:
            recs, offset = self.client.scroll(
                name, limit=512, offset=offset, with_payload=True, with_vectors=with_vectors
            )
            for r in recs:
                vec = r.vector if isinstance(r.vector, dict) else {}
                yield PointData(
                    str(r.id),
                    {k: np.asarray(v, np.float32) for k, v in vec.items()},
                    dict(r.payload or {}),
                )
            if offset is None:
                return

    def optimize(self, name: str) -> None:
        """A server indexes in the background; nothing to do."""

    def flush(self, name: str) -> None:
        """Upserts use wait=True: durable when they return."""

    def close(self) -> None:
        self.client.close()


def _client_filter(filters: Sequence[Condition]) -> Any:
    from qdrant_client import models as m

    if not filters:
        return None
    must: list[Any] = []
    for c in filters:
        if c.op == "eq" and isinstance(c.value, float):
            must.append(m.FieldCondition(key=c.key, range=m.Range(gte=c.value, lte=c.value)))
        elif c.op == "eq":
            must.append(m.FieldCondition(key=c.key, match=m.MatchValue(value=c.value)))
        elif c.op == "in":
            must.append(
                m.FieldCondition(key=c.key, match=m.MatchAny(any=[str(v) for v in c.value]))
            )
        else:
            must.append(m.FieldCondition(key=c.key, range=m.Range(**{c.op: float(c.value)})))
    return m.Filter(must=must)


# ----------------------------------------------------------------------------- factory


def open_store() -> VectorStore:
    """The store the settings ask for: a server when MEDLENS_QDRANT_URL is set, else
    embedded shards under MEDLENS_HOME/qdrant."""
    from medlens.config import get_settings

    s = get_settings()
    url = getattr(s, "qdrant_url", None)
    if url:
        return ServerStore(
            url,
            getattr(s, "qdrant_api_key", None),
            shards=getattr(s, "qdrant_shards", 2),
            replicas=getattr(s, "qdrant_replicas", 1),
        )
    return EdgeStore(s.home / "qdrant")
