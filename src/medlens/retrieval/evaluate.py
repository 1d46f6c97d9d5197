"""Retrieval quality through the case library (real index, real search, real filters).

- ``covid_notes_recall``: COVID-19 image data collection, held-out patients (split
  "test"). Text→image: each distinct clinical note is a query; a hit is a top-K image
  whose own note is that note. Image→text: each image queries the notes; a hit is its own
  note in the top K. Recall@1/5/10, with the gallery size and chance level beside them.
- ``isic_text_precision``: ISIC 2018 Task 3 test images; each finding's name ("Melanoma")
  is the query, precision@10 = share of the top 10 images labelled with that finding,
  next to the class's prevalence (the chance level).

    python -m medlens.retrieval.evaluate [--model lite] [--out results/retrieval.json]

Both index into their own libraries (``eval_covid``, ``eval_isic``), so they leave the
user's libraries alone; with a warm embedding cache they take seconds.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from medlens.retrieval.library import ingest, search
from medlens.retrieval.store import Condition, VectorStore, open_store


def _image_hits(
    q: np.ndarray, encoder: Any, library: str, domain: str, k: int, filters: list, store: Any
) -> list[dict[str, Any]]:
    """The top-``k`` case-library images for query vector ``q`` (a text embedding)."""
    return search(
        q,
        encoder.fingerprint,
        using="image",
        library=library,
        domain=domain,
        k=k,
        filters=filters,
        store=store,
    )


def covid_notes_recall(
    encoder: Any,
    *,
    library: str = "eval_covid",
    split: str = "test",
    ks: tuple[int, ...] = (1, 5, 10),
    store: VectorStore | None = None,
) -> dict[str, Any]:
    from medlens.datasets import load_dataset

    store = store or open_store()
    m = load_dataset("covid_chestxray")
    m = replace(m, records=[r for r in m.records if r.text and r.path is not None])
    ingest(m, encoder, library, store=store, source={"dataset": "covid_chestxray"})
    test = [r for r in m.records if r.split == split]
    notes = sorted({r.text for r in test})
    conds = [Condition("split", "eq", split), Condition("dataset", "eq", m.name)]
    kmax = max(ks)
    t2i = {k: 0 for k in ks}
    note_emb = encoder.embed_texts(notes)
    for note, q in zip(notes, note_emb, strict=True):
        hits = _image_hits(q, encoder, library, m.domain, kmax, conds, store)
        ranks = [i for i, h in enumerate(hits) if h["text"] == note]
        for k in ks:
            t2i[k] += bool(ranks and ranks[0] < k)
    # image→text: one query per image, against the text vectors of the same split.
    from medlens import embeddings
    from medlens.retrieval.library import record_hash

    keys = [record_hash(m, r) for r in test]  # the vectors ingest just cached
    img = embeddings.open_store().get_many(keys, embeddings.image_space(encoder))
    i2t = {k: 0 for k in ks}
    n_img = 0
    for r, key in zip(test, keys, strict=True):
        if key not in img:
            continue
        n_img += 1
        hits = search(
            img[key],
            encoder.fingerprint,
            using="text",
            library=library,
            domain=m.domain,
            k=kmax * 4,
            filters=conds,
            store=store,
        )
        distinct: list[str] = []
        for h in hits:  # several images share one note: rank distinct notes
            if h["text"] not in distinct:
                distinct.append(h["text"])
        rank = distinct.index(r.text) if r.text in distinct else None
        for k in ks:
            i2t[k] += rank is not None and rank < k
    return {
        "dataset": "covid_chestxray",
        "split": split,
        "model": encoder.name,
        "fingerprint": encoder.fingerprint,
        "queries_text": len(notes),
        "gallery_images": len(test),
        "text_to_image": {f"recall@{k}": round(t2i[k] / max(1, len(notes)), 4) for k in ks},
        "image_to_text": {f"recall@{k}": round(i2t[k] / max(1, n_img), 4) for k in ks},
        "chance_text_to_image@1": round(
            float(np.mean([sum(r.text == n for r in test) for n in notes])) / max(1, len(test)),
            4,
        ),
        "chance_image_to_text@1": round(1 / max(1, len(notes)), 4),
    }


def isic_text_precision(
    encoder: Any,
    *,
    library: str = "eval_isic",
    k: int = 10,
    store: VectorStore | None = None,
) -> dict[str, Any]:
    from medlens.datasets import load_dataset
    from medlens.knowledge import load_domain

    store = store or open_store()
    m = load_dataset("isic2018")
    ingest(m, encoder, library, store=store, source={"dataset": "isic2018"})
    pack = load_domain(m.domain)
    prevalence: dict[str, int] = {}
    for r in m.records:
        for fid in pack.findings_for(m.vocab, r.labels):
            prevalence[fid] = prevalence.get(fid, 0) + 1
    per_class = {}
    for fid in sorted(prevalence):
        name = pack.finding(fid).name
        q = encoder.embed_texts([name])[0]
        filters = [Condition("dataset", "eq", m.name)]
        hits = _image_hits(q, encoder, library, m.domain, k, filters, store)
        per_class[fid] = {
            "query": name,
            f"precision@{k}": round(sum(fid in h["findings"] for h in hits) / k, 3),
            "prevalence": round(prevalence[fid] / len(m.records), 3),
        }
    return {
        "dataset": "isic2018 (task 3 test, 1512 images)",
        "model": encoder.name,
        "fingerprint": encoder.fingerprint,
        "per_class": per_class,
        f"mean_precision@{k}": round(
            float(np.mean([v[f"precision@{k}"] for v in per_class.values()])), 3
        ),
        "mean_prevalence": round(float(np.mean([v["prevalence"] for v in per_class.values()])), 3),
    }


def evaluate_library(encoder: Any) -> dict[str, Any]:
    """Both retrieval measurements (``medlens search-quality``)."""
    return {
        "covid_notes": covid_notes_recall(encoder),
        "isic_text_to_image": isic_text_precision(encoder),
    }
