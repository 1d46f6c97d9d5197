"""Case library: ingest a dataset's images, text and labels into the vector store; search it.

Design decisions (each one a requirement of issue #5):
- One collection per (library, domain, encoder fingerprint): two models never mix, and a
  retrained model gets a fresh collection rather than silently comparing across spaces.
- Point ids are uuid5(content hash | dataset | record id): re-indexing is idempotent and an
  interrupted ingest resumes by skipping the ids already stored.
- Embeddings come from the embedding cache first (``medlens.embeddings``, looked up by
  the file's sha256 before any decoding); only misses are decoded (DataLoader workers)
  and run through the model.
- Named vectors ``image`` and ``text`` (reports, clinical notes, symptom sentences); a
  text-only record (a report without its image) has only ``text``.
- The payload holds labels, mapped finding ids, the record's text, the thumbnail's name
  (relative to ``MEDLENS_HOME/thumbnails``, resolved server-side only) and a whitelist of
  safe metadata (sex, age, view, ...); the patient/group id is stored only as a keyed hash
  (a pseudonym), and DICOM identifiers are never read.
- Case ids are opaque (an HMAC of content hash, dataset and record id, keyed with the
  installation secret): file names and record ids can name a patient. A library owner
  opts in to the datasets' own ids (and image paths relative to the dataset root) with
  MEDLENS_LIBRARY_NAMED_IDS=1 or ``medlens index --named-ids``. No payload field and no
  search result ever holds an absolute path.
- Each library keeps a JSON record (``MEDLENS_HOME/libraries/<name>.json``) of the
  manifest versions and model fingerprint every collection was built from, so
  ``medlens index --check`` can say when it is stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medlens import embeddings
from medlens.embeddings import FillStats, Store, text_key
from medlens.errors import ConfigError, MedLensError
from medlens.retrieval.store import Condition, PointData, VectorStore, open_store

DEFAULT_LIBRARY = "default"
LIBRARY_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,39}$")
POINT_NAMESPACE = uuid.UUID("6f1c3e0a-6b1e-4c55-9f54-6d65646c656e")  # "medlens" cases
THUMB_SIZE = 160
# Record metadata that may enter a payload (everything else is left out: it may identify).
SAFE_META = (
    "age",
    "sex",
    "gender",
    "view",
    "region",
    "localization",
    "modality",
    "source",
    "license",
    "fitspatrick",
    "dx_type",
)
Advance = Callable[[int], None]
# (record, content hash, point id) of a record to index.
Item = tuple[Any, str, str]
# emit(items, image vectors by content hash, safe context by content hash): payloads,
# upsert, progress.
Emit = Callable[[list[Item], dict[str, np.ndarray], dict[str, dict]], None]
# embed_misses(manifest, encoder, cache, items, cached, emit, report, batch_size, workers):
# decode + thumbnail + embed ``items`` (adding vectors to ``cached``), then ``emit`` them.
EmbedMisses = Callable[
    [Any, Any, Store, list[Item], dict[str, np.ndarray], Emit, "IngestReport", int, int], None
]


# ----------------------------------------------------------------------------- naming


def check_library(name: str) -> str:
    if not LIBRARY_RE.match(name):
        raise ConfigError(
            f"library name {name!r}: use 1-40 lower-case letters, digits or _ (e.g. clinic_2024)"
        )
    return name


def collection_name(library: str, domain: str, fingerprint: str) -> str:
    return f"cases-{check_library(library)}-{domain}-{fingerprint}"


def libraries_dir() -> Path:
    from medlens.config import get_settings

    return get_settings().home / "libraries"


def thumbnails_dir() -> Path:
    from medlens.config import get_settings

    return get_settings().home / "thumbnails"


def thumbnail_name(content_hash: str) -> str:
    """The thumbnail's name relative to ``thumbnails_dir()``: what payloads store."""
    return f"{content_hash[:2]}/{content_hash}.jpg"


def thumbnail_path(content_hash: str) -> Path:
    return thumbnails_dir() / thumbnail_name(content_hash)


_THUMB_NAME = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}\.jpg$")


def public_thumbnail(value: str | None) -> str | None:
    """A payload's thumbnail as a relative name. Libraries built before opaque ids stored
    absolute paths; the name is recovered from them so no response shows the path."""
    if not value:
        return None
    p = Path(value)
    name = f"{p.parent.name}/{p.name}" if p.is_absolute() else value
    return name if _THUMB_NAME.match(name) else None


def resolve_thumbnail(value: str | None) -> Path | None:
    """Server side only: the file of a payload's thumbnail name, inside thumbnails_dir()."""
    name = public_thumbnail(value)
    return thumbnails_dir() / name if name else None


# ----------------------------------------------------------------------------- registry


def read_library(name: str) -> dict[str, Any]:
    path = libraries_dir() / f"{check_library(name)}.json"
    if not path.is_file():
        return {"name": name, "collections": {}}
    return json.loads(path.read_text("utf-8"))


def list_libraries() -> list[str]:
    d = libraries_dir()
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


@contextlib.contextmanager
def _registry_lock(name: str) -> Iterator[None]:
    import fcntl

    from medlens.config import ensure_home, private_dir

    ensure_home()
    d = private_dir(libraries_dir())
    fd = os.open(d / f".{name}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _update_library(name: str, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read-modify-write of a library record under a file lock, replaced atomically."""
    with _registry_lock(name):
        data = read_library(name)
        fn(data)
        path = libraries_dir() / f"{name}.json"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)
    return data


# ----------------------------------------------------------------------------- records


def record_hash(manifest: Any, record: Any) -> str:
    """sha256 of what the model sees: the image file's bytes (the same value as
    ``DecodedImage.content_hash``), an array row's bytes, or a text-only record's text
    (``embeddings.record_key``: the embedding cache's key for the record)."""
    return embeddings.record_key(manifest, record)


def point_id(content_hash: str, dataset: str, record_id: str) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, f"{content_hash}|{dataset}|{record_id}"))


def _secret() -> bytes:
    from medlens.config import get_settings

    return get_settings().install_secret()


def case_id(
    content_hash: str,
    dataset: str,
    record_id: str,
    *,
    named: bool = False,
    secret: bytes | None = None,
) -> str:
    """The id a case is shown by: opaque (16 hex of an HMAC of content hash, dataset and
    record id with the installation secret: stable across re-indexing, unique per record,
    and reveals neither the file name nor, without the secret, whether an image is in the
    library), or the record's own id when the library owner opted in (``named``)."""
    if named:
        return str(record_id)
    msg = f"case|{content_hash}|{dataset}|{record_id}".encode()
    return hmac.new(secret or _secret(), msg, hashlib.sha256).hexdigest()[:16]


def group_pseudonym(dataset: str, group: str, secret: bytes | None = None) -> str:
    """Keyed pseudonym of a patient/group id: "same patient" can be excluded from the
    neighbours, and a guessable id (PAT_123) cannot be confirmed without the secret."""
    msg = f"group|{dataset}|{group}".encode()
    return hmac.new(secret or _secret(), msg, hashlib.sha256).hexdigest()[:16]


def _relative_path(manifest: Any, record: Any) -> str | None:
    """The image's path relative to its dataset root (never absolute); None when it lies
    outside the root."""
    if record.path is None:
        return None
    try:
        root = Path(manifest.root).resolve()
        return Path(record.path).resolve().relative_to(root).as_posix()
    except (TypeError, ValueError):
        return None


def _norm_sex(v: Any) -> str | None:
    s = str(v or "").strip().upper()
    return {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}.get(s) or ("O" if s == "O" else None)


def _norm_age(v: Any) -> float | None:
    try:
        a = float(str(v).strip().rstrip("Yy"))
    except (TypeError, ValueError):
        return None
    return a if 0 <= a < 130 else None


def _findings(manifest: Any, record: Any) -> list[str]:
    from medlens.knowledge import load_domain

    pack = load_domain(manifest.domain)
    vocab = manifest.vocab_of(record) if hasattr(manifest, "vocab_of") else manifest.vocab
    # A label the pack does not know stays in "labels", unmapped.
    return pack.findings_for(vocab, record.labels, unknown="skip")


def build_payload(
    manifest: Any,
    record: Any,
    content_hash: str,
    has_image: bool,
    *,
    named_ids: bool = False,
    secret: bytes | None = None,
) -> dict:
    """What a point stores: no absolute path, and with opaque ids (the default) neither
    the record id nor the file name, which can carry a patient's name."""
    secret = secret or _secret()
    meta = {k: record.meta.get(k) for k in SAFE_META if record.meta.get(k) is not None}
    payload: dict[str, Any] = {
        "case_id": case_id(
            content_hash, manifest.name, str(record.id), named=named_ids, secret=secret
        ),
        "dataset": manifest.name,
        "dataset_version": manifest.version,
        "domain": manifest.domain,
        "split": record.split,
        "labels": [str(x) for x in record.labels],
        "findings": _findings(manifest, record),
        "text": record.text,
        "content_hash": content_hash,
        "image_path": _relative_path(manifest, record) if named_ids else None,
        "thumbnail": thumbnail_name(content_hash) if has_image else None,
        # A pseudonym: "same patient" can be excluded from neighbours without the raw id.
        "group_hash": (
            group_pseudonym(manifest.name, str(record.group), secret) if record.group else None
        ),
        "sex": _norm_sex(meta.pop("sex", None) or meta.pop("gender", None)),
        "age": _norm_age(meta.pop("age", None)),
        "view": str(meta.pop("view")).upper() if meta.get("view") else None,
        "meta": {k: str(v) for k, v in meta.items()},
    }
    return payload


# ----------------------------------------------------------------------------- decoding


class _DecodeSet:
    """Decode + thumbnail for the records whose embedding or thumbnail is missing.

    Runs in DataLoader workers: PIL/pydicom decoding and JPEG thumbnail writes overlap
    with the model's forward pass in the main process. Returns numpy only (no torch), and
    only pixels + safe StudyContext fields (identifiers are dropped here).
    """

    def __init__(self, manifest: Any, items: list[tuple[Any, str]]):
        self.manifest, self.items = manifest, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record, chash = self.items[i]
        ctx = None
        try:
            if record.path is not None:
                from medlens.io import load_image

                img = load_image(record.path)
                pixels, ctx = img.pixels, img.context
            else:
                pixels = self.manifest.image(record)
        except MedLensError as exc:
            return {"i": i, "error": f"{type(exc).__name__}: {exc}"}
        _write_thumbnail(pixels, thumbnail_path(chash))
        return {"i": i, "pixels": pixels, "context": safe_context(ctx)}


def safe_context(ctx: Any) -> dict[str, Any]:
    """The StudyContext fields a payload may take (DICOM only: sex, age, view, modality);
    every other field, and the identifiers, stay where the image was decoded."""
    if ctx is None or ctx.source_format != "dicom":
        return {}
    return {"sex": ctx.sex, "age": ctx.age_years, "view": ctx.view, "modality": ctx.modality}


def thumbnail_jpeg(pixels: np.ndarray) -> bytes:
    """The library thumbnail of ``pixels``: JPEG bytes, longer side THUMB_SIZE."""
    import io

    from PIL import Image

    im = Image.fromarray(pixels)
    im.thumbnail((THUMB_SIZE, THUMB_SIZE))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def store_thumbnail(jpeg: bytes, path: Path) -> None:
    """Write thumbnail bytes to ``path`` (under thumbnails_dir()) unless it exists."""
    if path.is_file():
        return
    from medlens.config import private_dir

    private_dir(thumbnails_dir())
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=".thumb.", suffix=".jpg", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(jpeg)
        os.replace(tmp, path)  # atomic: a reader never sees half a thumbnail
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_thumbnail(pixels: np.ndarray, path: Path) -> None:
    if not path.is_file():
        store_thumbnail(thumbnail_jpeg(pixels), path)


def _identity(batch: list) -> list:
    return batch


def _die_with_parent(_worker_id: int) -> None:
    """Linux: a decoding worker gets SIGKILL when the ingest process dies (even by kill -9).

    Forked workers share the parent's open files, including the vector shard's lock; an
    orphaned worker would otherwise keep the library locked until it noticed, blocking
    the resume.
    """
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers exit when they notice
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


# ----------------------------------------------------------------------------- ingest


@dataclass
class IngestReport:
    library: str
    collection: str
    dataset: str
    domain: str
    model: str
    fingerprint: str
    records: int = 0
    already_indexed: int = 0
    indexed: int = 0
    image_forward: int = 0  # images that went through the model (cache misses)
    image_cache_hits: int = 0
    text_forward: int = 0
    text_cache_hits: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["failed"] = self.failed[:20]
        d["failed_count"] = len(self.failed)
        return d


def ingest(
    manifest: Any,
    encoder: Any,
    library: str = DEFAULT_LIBRARY,
    *,
    source: dict[str, Any] | None = None,
    store: VectorStore | None = None,
    cache: Store | None = None,
    batch_size: int = 32,
    workers: int = 2,
    refresh: bool = False,
    advance: Advance | None = None,
    named_ids: bool | None = None,
    embed_misses: EmbedMisses | None = None,
) -> IngestReport:
    """Index ``manifest`` into ``library``; returns what was done.

    Idempotent: records already in the collection are skipped (``refresh`` rewrites
    them, still without forward passes when the cache is warm). ``advance(n)`` is called
    as records complete (progress bars). ``named_ids`` (default MEDLENS_LIBRARY_NAMED_IDS)
    shows cases by their record ids instead of opaque ids; changing it for a collection
    rewrites that dataset's payloads. ``embed_misses`` decodes and embeds the records that
    need it (default: DataLoader workers in this process, ``_ingest_slow``; Ray workers:
    ``medlens.distributed.ingest``); everything else (hashing, resume, payloads, the
    store, the registry) stays here.
    """
    from medlens.config import get_settings

    t0 = time.perf_counter()
    check_library(library)
    settings = get_settings()
    named = settings.library_named_ids if named_ids is None else bool(named_ids)
    secret = settings.install_secret()
    store = store or open_store()
    cache = cache or embeddings.open_store()
    fp, space = encoder.fingerprint, embeddings.image_space(encoder)
    coll = collection_name(library, manifest.domain, fp)
    built = read_library(library)["collections"].get(coll, {}).get("datasets", {})
    if manifest.name in built and bool(built[manifest.name].get("named_ids")) != named:
        refresh = True  # the ids of this dataset's points change: rewrite every payload
    rep = IngestReport(library, coll, manifest.name, manifest.domain, encoder.name, fp)
    store.create(coll, {"image": encoder.dim, "text": encoder.dim})

    records = [
        r for r in manifest.records if r.path is not None or r.array_index is not None or r.text
    ]
    rep.records = len(records)
    hashes, todo = [], []
    for r in records:
        try:
            h = record_hash(manifest, r)
        except (OSError, MedLensError) as exc:
            rep.failed.append(f"{r.id}: {exc}")
            continue
        hashes.append((r, h, point_id(h, manifest.name, str(r.id))))
    present = set() if refresh else store.present(coll, [p for _, _, p in hashes])
    for r, h, pid in hashes:
        if pid in present:
            rep.already_indexed += 1
        else:
            todo.append((r, h, pid))
    if advance and rep.already_indexed:
        advance(rep.already_indexed + len(rep.failed))

    _register(library, coll, manifest, encoder, source, status="building", named_ids=named)
    has_image = {id(r): (r.path is not None or r.array_index is not None) for r, _, _ in todo}
    cached = cache.get_many([h for r, h, _ in todo if has_image[id(r)]], space)
    # Cache hits with a thumbnail need no decoding at all.
    fast = [
        t
        for t in todo
        if not has_image[id(t[0])] or (t[1] in cached and thumbnail_path(t[1]).is_file())
    ]
    fast_ids = {pid for _, _, pid in fast}
    slow = [t for t in todo if t[2] not in fast_ids]

    def emit(
        batch: list[tuple[Any, str, str]],
        img_vecs: dict[str, np.ndarray],
        contexts: dict[str, dict],
    ) -> None:
        text_vecs = _text_vectors(encoder, cache, [r.text for r, _, _ in batch if r.text], rep)
        points = []
        for r, h, pid in batch:
            vecs: dict[str, np.ndarray] = {}
            if h in img_vecs:
                vecs["image"] = img_vecs[h]
            if r.text:
                vecs["text"] = text_vecs[text_key(r.text)]
            if not vecs:
                continue
            payload = build_payload(manifest, r, h, "image" in vecs, named_ids=named, secret=secret)
            for k, v in contexts.get(h, {}).items():
                if v is not None and payload.get(k) is None:
                    payload[k] = _norm_sex(v) if k == "sex" else v
            points.append(PointData(pid, vecs, payload))
        store.upsert(coll, points)
        rep.indexed += len(points)
        if advance:
            advance(len(batch))

    for i in range(0, len(fast), batch_size):
        chunk = fast[i : i + batch_size]
        rep.image_cache_hits += sum(1 for _, h, _ in chunk if h in cached)
        emit(chunk, cached, {})
    if slow:
        run = embed_misses or _ingest_slow
        run(manifest, encoder, cache, slow, cached, emit, rep, batch_size, workers)
    store.flush(coll)
    if rep.indexed:
        store.optimize(coll)
    count = store.count(coll)
    _register(
        library, coll, manifest, encoder, source, status="ready", points=count, named_ids=named
    )
    rep.seconds = round(time.perf_counter() - t0, 2)
    return rep


def _ingest_slow(manifest, encoder, cache, slow, cached, emit, rep, batch_size, workers) -> None:
    """Decode in DataLoader workers; embed cache misses; thumbnails for the rest."""
    from torch.utils.data import DataLoader

    space = embeddings.image_space(encoder)
    ds = _DecodeSet(manifest, [(r, h) for r, h, _ in slow])
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=max(0, int(workers)),
        collate_fn=_identity,
        shuffle=False,
        worker_init_fn=_die_with_parent,
    )
    for items in loader:
        batch, pixels, keys, contexts = [], [], [], {}
        for it in items:
            r, h, pid = slow[it["i"]]
            if "error" in it:
                rep.failed.append(f"{r.id}: {it['error']}")
                continue
            batch.append((r, h, pid))
            contexts[h] = it["context"]
            if h in cached:
                rep.image_cache_hits += 1
            elif h not in keys:
                pixels.append(it["pixels"])
                keys.append(h)
        if pixels:  # the cache's fill loop: one forward pass over this batch's misses
            stats = FillStats()
            emb = embeddings.fill(
                pixels,
                keys,
                space,
                lambda ims: encoder.embed_images(ims, batch_size=16),
                store=cache,
                batch_size=len(pixels),
                stats=stats,
            )
            cached.update(zip(keys, emb, strict=True))
            rep.image_forward += stats.computed
            rep.image_cache_hits += stats.hits  # stored meanwhile by another process
        emit(batch, cached, contexts)


def _text_vectors(encoder, cache, texts, rep) -> dict[str, np.ndarray]:
    """Vectors of the distinct ``texts`` by text hash; the misses in one forward call."""
    distinct = list({text_key(t): t for t in texts}.values())
    stats = FillStats()
    emb = embeddings.embed_texts(
        encoder, distinct, store=cache, batch_size=max(1, len(distinct)), stats=stats
    )
    rep.text_cache_hits += stats.hits
    rep.text_forward += stats.computed
    return dict(zip((text_key(t) for t in distinct), emb, strict=True))


def _register(
    library, coll, manifest, encoder, source, *, status, points=None, named_ids=False
) -> None:
    def fn(data: dict[str, Any]) -> None:
        c = data["collections"].setdefault(coll, {"datasets": {}})
        c.update(
            {
                "domain": manifest.domain,
                "model": encoder.name,
                "fingerprint": encoder.fingerprint,
                "dim": encoder.dim,
                "status": status,
            }
        )
        if points is not None:
            c["points"] = points
        c["datasets"][manifest.name] = {
            "version": manifest.version,
            "records": len(manifest.records),
            "source": source or {"dataset": manifest.name, "root": str(manifest.root)},
            "indexed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "named_ids": bool(named_ids),
        }

    _update_library(library, fn)


# ----------------------------------------------------------------------------- sources


def load_source(source: str, domain: str | None = None) -> tuple[Any, dict[str, Any]]:
    """A dataset name, a folder (recognised layout or plain images) or a CSV manifest →
    (Manifest, a description that ``--check`` can reload)."""
    from medlens.datasets import DATASETS, load_dataset, load_path

    if source in DATASETS:
        return load_dataset(source), {"dataset": source}
    path = Path(source).expanduser()
    if not path.exists() and not path.is_absolute():
        from medlens.config import get_settings

        data = get_settings().data  # "isic2018-task3-test": a folder of the data root
        if data is not None and (data / path).exists():
            path = data / path
    if not path.exists():
        raise ConfigError(
            f"{source!r} is neither a dataset name ({', '.join(DATASETS)}) nor an existing path"
        )
    if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
        from medlens.datasets import detect_dataset

        if detect_dataset(path) is None:
            return _csv_manifest(path, domain), {"csv": str(path.resolve()), "domain": domain}
    m = load_path(path, domain)
    return m, {"path": str(path.resolve()), "domain": domain}


def _csv_manifest(path: Path, domain: str | None) -> Any:
    """A CSV with conventional column names: image|path|file, label(s), text|report|notes,
    split, id, group|patient."""
    from medlens.datasets import load_csv_manifest

    if domain is None:
        raise ConfigError(f"{path.name}: pass --domain for a CSV manifest")
    with open(path, newline="", encoding="utf-8") as fh:
        header = [h.strip() for h in fh.readline().replace("\t", ",").split(",")]

    def pick(*names: str) -> str | None:
        return next((h for h in header if h.lower() in names), None)

    image = pick("image", "path", "file", "filename", "image_path")
    if image is None:
        raise ConfigError(f"{path.name}: no image column (image, path, file, filename)")
    return load_csv_manifest(
        path,
        image,
        pick("label", "labels", "dx", "diagnosis"),
        domain=domain,
        vocab=path.stem,
        name=path.stem,
        label_sep="|",
        id_col=pick("id", "case_id"),
        group_col=pick("group", "patient", "patient_id"),
        split_col=pick("split"),
        text_col=pick("text", "report", "notes", "clinical_notes"),
    )


def check_libraries(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every collection of the named libraries (default all) with whether its datasets
    and model still match what it was built from. A stale library keeps working; its
    results describe the old data or model until it is re-indexed."""
    from medlens.models import load_encoder

    rows = []
    fingerprints: dict[str, str] = {}
    for lib in names or list_libraries():
        for coll, c in read_library(lib)["collections"].items():
            reasons = []
            try:
                if c["model"] not in fingerprints:
                    fingerprints[c["model"]] = load_encoder(c["model"]).fingerprint
                if fingerprints[c["model"]] != c["fingerprint"]:
                    reasons.append(
                        f"model {c['model']} is now {fingerprints[c['model']]}, "
                        f"built with {c['fingerprint']}"
                    )
            except MedLensError as exc:
                reasons.append(f"model {c['model']} cannot be loaded: {exc}")
            for name, d in c["datasets"].items():
                try:
                    m = _reload(d["source"], c["domain"])
                    if m.version != d["version"]:
                        reasons.append(
                            f"dataset {name} is now {m.version}, built from {d['version']}"
                        )
                except MedLensError as exc:
                    reasons.append(f"dataset {name} cannot be loaded: {exc}")
            if c.get("status") != "ready":
                reasons.append("the last ingest did not finish: run medlens index again")
            rows.append(
                {
                    "library": lib,
                    "collection": coll,
                    "domain": c["domain"],
                    "model": c["model"],
                    "points": c.get("points"),
                    "stale": bool(reasons),
                    "reasons": reasons,
                }
            )
    return rows


def _reload(source: dict[str, Any], domain: str) -> Any:
    from medlens.datasets import load_dataset

    if "dataset" in source and "root" not in source:
        return load_dataset(source["dataset"])
    if "dataset" in source:
        return load_dataset(source["dataset"], source["root"])
    if "csv" in source:
        return _csv_manifest(Path(source["csv"]), source.get("domain") or domain)
    return load_source(source["path"], source.get("domain") or domain)[0]


# ----------------------------------------------------------------------------- search


def collections_for(
    library: str, fingerprint: str, domain: str | None = None, store: VectorStore | None = None
) -> list[str]:
    store = store or open_store()
    prefix = f"cases-{check_library(library)}-"
    out = []
    for c in store.collections():
        if not (c.startswith(prefix) and c.endswith(f"-{fingerprint}")):
            continue
        if domain is None or c == collection_name(library, domain, fingerprint):
            out.append(c)
    return out


def search(
    vector: np.ndarray,
    fingerprint: str,
    *,
    using: str = "image",
    library: str = DEFAULT_LIBRARY,
    domain: str | None = None,
    k: int = 10,
    filters: Sequence[Condition] = (),
    store: VectorStore | None = None,
) -> list[dict[str, Any]]:
    """Nearest cases to ``vector`` (an image or text embedding of the model with
    ``fingerprint``) by their ``using`` vector: "image" or "text" (reports/notes)."""
    if using not in ("image", "text"):
        raise ConfigError(f"search target {using!r}: choose image or text")
    store = store or open_store()
    hits = []
    for coll in collections_for(library, fingerprint, domain, store):
        hits += store.search(coll, vector, using, k=k, filters=filters)
    hits.sort(key=lambda h: -h.score)
    return [result_row(h) for h in hits[:k]]


def result_row(hit: Any) -> dict[str, Any]:
    """A search result: no absolute path whatever the payload holds (libraries indexed
    before opaque ids stored them; re-index with --refresh to also make their ids opaque)."""
    p = hit.payload
    image_path = p.get("image_path")
    return {
        "case_id": p.get("case_id"),
        "dataset": p.get("dataset"),
        "domain": p.get("domain"),
        "labels": p.get("labels", []),
        "findings": p.get("findings", []),
        "similarity": round(float(hit.score), 4),
        "text": p.get("text"),
        "thumbnail": public_thumbnail(p.get("thumbnail")),
        "image_path": None if not image_path or Path(image_path).is_absolute() else image_path,
        "split": p.get("split"),
        "sex": p.get("sex"),
        "age": p.get("age"),
        "view": p.get("view"),
        "point_id": hit.id,
    }


def subset(manifest: Any, n: int, seed: str = "demo") -> Any:
    """A deterministic, label-balanced subset of ``n`` records (round robin over labels,
    each label's records ordered by a hash of their id)."""
    by_label: dict[str, list[Any]] = {}
    for r in manifest.records:
        by_label.setdefault("|".join(r.labels), []).append(r)
    for recs in by_label.values():
        recs.sort(key=lambda r: hashlib.sha256(f"{seed}|{r.id}".encode()).hexdigest())
    picked: list[Any] = []
    queues = [list(v) for _, v in sorted(by_label.items())]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return replace(manifest, records=picked)
