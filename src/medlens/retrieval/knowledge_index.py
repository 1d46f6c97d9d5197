"""Clinical knowledge RAG: the knowledge packs' descriptions as retrievable passages.

Every passage is one section of one finding's description (long sections are split at
sentence boundaries), embedded with the finding's name in front so a query about the
image or the symptoms lands on the right condition. The collection is named by domain,
pack hash and encoder fingerprint, so editing a pack or changing the model builds a new
one automatically (and the outdated one is dropped). Each passage carries its finding id,
section and a ``source`` string naming the pack file, hash and YAML path, so any sentence
shown to a user can be traced back to where it was written.
"""

from __future__ import annotations

import re
import threading
import uuid
from typing import Any

import numpy as np

from medlens.retrieval.store import Condition, PointData, VectorStore, open_store

MAX_CHARS = 400
NAMESPACE = uuid.UUID("8e7d1a52-0a4f-4f0c-b8a1-6b6e6f776c64")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")
_built: set[str] = set()
_lock = threading.Lock()


def chunk(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Split at sentence ends into pieces of at most ~max_chars (a sentence is never cut)."""
    out: list[str] = []
    cur = ""
    for sent in _SENT.split(text.strip()):
        if cur and len(cur) + 1 + len(sent) > max_chars:
            out.append(cur)
            cur = sent
        else:
            cur = f"{cur} {sent}".strip()
    if cur:
        out.append(cur)
    return out


def passages(domain: str) -> list[dict[str, Any]]:
    """All passages of one pack, in pack order, with their provenance."""
    from medlens.knowledge import load_domain

    pack = load_domain(domain)
    rows = []
    for f in pack.findings:
        for section, text in f.description.sections().items():
            for i, piece in enumerate(chunk(text)):
                rows.append(
                    {
                        "finding_id": f.id,
                        "finding_name": f.name,
                        "section": section,
                        "chunk": i,
                        "text": piece,
                        "domain": domain,
                        "source": (
                            f"medlens/knowledge/{domain}.yaml@{pack.source_hash}"
                            f"#findings[{f.id}].description.{section}"
                        ),
                    }
                )
    return rows


def collection(domain: str, pack_hash: str, fingerprint: str) -> str:
    return f"knowledge-{domain}-{pack_hash}-{fingerprint}"


def ensure_index(encoder: Any, domain: str, store: VectorStore | None = None) -> str:
    """The knowledge collection for (pack, encoder), built if missing; older ones for the
    same domain and encoder are dropped."""
    from medlens.knowledge import load_domain

    store = store or open_store()
    name = collection(domain, load_domain(domain).source_hash, encoder.fingerprint)
    key = f"{store.backend}|{getattr(store, 'root', '') or getattr(store, 'url', '')}|{name}"
    if key in _built:
        return name
    with _lock:
        if store.exists(name) and store.count(name) > 0:
            _built.add(key)
            return name
        rows = passages(domain)
        emb = _embed_cached(encoder, [f"{r['finding_name']}: {r['text']}" for r in rows])
        store.create(name, {"text": encoder.dim})
        store.upsert(
            name,
            [
                PointData(
                    str(uuid.uuid5(NAMESPACE, r["source"] + f"/{r['chunk']}")), {"text": e}, r
                )
                for r, e in zip(rows, emb, strict=True)
            ],
        )
        store.flush(name)
        for old in store.collections():
            if (
                old.startswith(f"knowledge-{domain}-")
                and old.endswith(f"-{encoder.fingerprint}")
                and old != name
            ):
                store.drop(old)
        _built.add(key)
    return name


def _embed_cached(encoder: Any, texts: list[str]) -> np.ndarray:
    """Text embeddings through the embedding cache: after a pack edit only the changed
    passages go through the model (in one call)."""
    from medlens import embeddings

    return embeddings.embed_texts(
        encoder,
        texts,
        store=embeddings.open_store(),
        batch_size=max(1, len(texts)),
        unique=True,
    )


_name_emb: dict[tuple[str, str], np.ndarray] = {}


def knowledge_passages(
    encoder: Any,
    finding_ids: list[str],
    domain: str,
    k_per_finding: int = 2,
    query_embedding: np.ndarray | None = None,
    store: VectorStore | None = None,
) -> list[dict[str, Any]]:
    """The ``k_per_finding`` passages of each finding most relevant to the query.

    The query is ``query_embedding`` when given (the image's or the symptoms' embedding:
    "what about melanoma matters for *this* case"), else the finding's name. Each result:
    finding_id, finding_name, section, text, source, score.
    """
    store = store or open_store()
    name = ensure_index(encoder, domain, store)
    out = []
    for fid in finding_ids:
        if query_embedding is not None:
            q = np.asarray(query_embedding, np.float32).ravel()
        else:
            from medlens.knowledge import load_domain

            name_key = (encoder.fingerprint, f"{domain}/{fid}")
            if name_key not in _name_emb:
                fname = load_domain(domain).finding(fid).name
                _name_emb[name_key] = encoder.embed_texts([fname])[0]
            q = _name_emb[name_key]
        hits = store.search(
            name, q, "text", k=k_per_finding, filters=[Condition("finding_id", "eq", fid)]
        )
        for h in hits:
            p = h.payload
            out.append(
                {
                    "finding_id": p["finding_id"],
                    "finding_name": p["finding_name"],
                    "section": p["section"],
                    "text": p["text"],
                    "source": p["source"],
                    "score": round(float(h.score), 4),
                }
            )
    return out


def search_knowledge(
    encoder: Any, text: str, domain: str, k: int = 5, store: VectorStore | None = None
) -> list[dict[str, Any]]:
    """Free-text question → passages from any finding of the domain."""
    store = store or open_store()
    name = ensure_index(encoder, domain, store)
    q = encoder.embed_texts([text])[0]
    return [
        {
            **{
                k2: h.payload[k2]
                for k2 in ("finding_id", "finding_name", "section", "text", "source")
            },
            "score": round(float(h.score), 4),
        }
        for h in store.search(name, q, "text", k=k)
    ]
