"""The MedLens facade: the one place where the flow of an analysis is wired.

decode (io) → one encoder forward → zero-shot logits (+ symptom evidence) → probabilities
→ triage → descriptions of the top findings → an ``Analysis`` (JSON-serialisable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens.analysis import domain as domain_mod
from medlens.analysis import zeroshot
from medlens.analysis.calibration import bias_vector
from medlens.analysis.symptoms import clean_symptoms, text_hash
from medlens.analysis.triage import Triage, triage
from medlens.config import Settings, get_settings
from medlens.errors import ConfigError, MedLensError
from medlens.io import DecodedImage, load_image
from medlens.knowledge import DOMAINS, KnowledgePack, load_domain

log = logging.getLogger("medlens")

SCHEMA_VERSION = "1"
DISCLAIMER = (
    "Research software for decision support only; not a diagnosis. "
    "A qualified clinician must interpret every result."
)
DOMAIN_CHOICES = ("auto", *DOMAINS)


@dataclass
class Analysis:
    """Result of one analysis. ``to_dict()`` is the documented JSON (docs/analysis.md)."""

    domain: str
    domain_source: str  # "given" | "dicom" | "image"
    domain_scores: dict[str, float]
    model: dict[str, str]
    findings: list[dict[str, Any]]  # all findings, sorted by probability
    triage: Triage
    descriptions: list[dict[str, Any]]
    input: dict[str, Any]
    symptoms: dict[str, Any] | None
    top_k: int
    similar_cases: list[dict[str, Any]] = field(default_factory=list)
    knowledge: list[dict[str, Any]] = field(default_factory=list)
    context_note: str | None = None  # why similar cases / knowledge are missing, if they are
    timings_ms: dict[str, float] = field(default_factory=dict)
    embedding: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "domain": self.domain,
            "domain_detection": {"source": self.domain_source, "scores": self.domain_scores},
            "model": self.model,
            "input": self.input,
            "findings": self.findings[: self.top_k],
            "triage": self.triage.to_dict(),
            "descriptions": self.descriptions,
            "symptoms": self.symptoms,
            "similar_cases": self.similar_cases,
            "knowledge": self.knowledge,
            "context_note": self.context_note,
            "disclaimer": DISCLAIMER,
            "timings_ms": self.timings_ms,
        }


class MedLens:
    """Analyze medical images with one vision-language encoder.

    >>> from medlens import MedLens
    >>> result = MedLens().analyze("lesion.jpg", symptoms="itchy, growing, bleeds")
    >>> result.triage.level
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str | None = None,
        settings: Settings | None = None,
        symptom_weight: float = 0.5,
        retrieval: bool = True,
    ):
        self.settings = settings or get_settings()
        self.model_name = model or self.settings.model
        self.device = device or self.settings.device
        self.symptom_weight = symptom_weight
        self.retrieval = retrieval
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:
            from medlens.models import load_encoder

            self._encoder = load_encoder(self.model_name, device=self.device)
        return self._encoder

    @property
    def cache_dir(self) -> Path:
        return self.settings.cache_dir / "prompts"

    def calibration(self) -> dict[str, Any]:
        return getattr(self.encoder, "calibration", None) or {}

    def _calibration_id(self) -> str | None:
        """Hash of the temperatures and thresholds in force: the fingerprint covers the
        weights only, so results record which calibration produced them."""
        cal = self.calibration()
        if not cal:
            return None
        used = {k: cal.get(k) for k in ("temperature", "bias", "thresholds")}
        return hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()[:12]

    # -- the flow ----------------------------------------------------------------------
    def decode(
        self, image: str | Path | bytes | DecodedImage, filename: str | None = None
    ) -> DecodedImage:
        if isinstance(image, DecodedImage):
            return image
        return load_image(
            image,
            filename=filename,
            max_bytes=self.settings.max_bytes,
            max_pixels=self.settings.max_pixels,
        )

    def analyze(
        self,
        image: str | Path | bytes | DecodedImage,
        *,
        symptoms: str | None = None,
        domain: str = "auto",
        top_k: int = 5,
        filename: str | None = None,
    ) -> Analysis:
        if domain not in DOMAIN_CHOICES:
            raise ConfigError(
                f"unknown domain {domain!r}; choose one of {', '.join(DOMAIN_CHOICES)}"
            )
        if top_k < 1:
            raise ConfigError("top_k must be at least 1")
        symptoms = clean_symptoms(symptoms, self.settings.max_text_chars)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        decoded = self.decode(image, filename)
        timings["decode"] = (time.perf_counter() - t0) * 1000

        t1 = time.perf_counter()
        enc = self.encoder
        emb = enc.embed_images([decoded.pixels])[0]
        timings["encode"] = (time.perf_counter() - t1) * 1000

        t2 = time.perf_counter()
        scores = domain_mod.domain_scores(emb, enc, self.cache_dir)[0]
        domain_scores = {d: round(float(s), 4) for d, s in zip(DOMAINS, scores, strict=True)}
        if domain != "auto":
            chosen, source = domain, "given"
        elif (from_ctx := domain_mod.domain_from_context(decoded.context)) is not None:
            chosen, source = from_ctx, "dicom"
        else:
            chosen, source = DOMAINS[int(np.argmax(scores))], "image"
        pack = load_domain(chosen)
        score_emb = self._scoring_embedding(pack, decoded.pixels, emb, timings)
        probs, sym = self._score(pack, score_emb, symptoms)
        tri = triage(pack, probs, self.calibration().get("thresholds", {}).get(pack.id))
        timings["score"] = (time.perf_counter() - t2) * 1000
        ranked = sorted(probs, key=probs.get, reverse=True)

        t3 = time.perf_counter()
        cases, passages, note = self._context(emb, pack.id, ranked[: min(3, top_k)])
        timings["retrieval"] = (time.perf_counter() - t3) * 1000
        timings["total"] = (time.perf_counter() - t0) * 1000

        findings = [self._finding_row(pack, fid, probs[fid]) for fid in ranked]
        descriptions = [self._description(pack, fid) for fid in ranked[: min(3, top_k)]]
        log.info(
            "analyzed input=%s domain=%s top=%s triage=%s in %.0f ms",
            decoded.content_hash[:12],
            chosen,
            ranked[0],
            tri.level,
            timings["total"],
        )
        return Analysis(
            domain=chosen,
            domain_source=source,
            domain_scores=domain_scores,
            model={
                "name": self.model_name,
                "fingerprint": enc.fingerprint,
                "calibration": self._calibration_id(),
            },
            findings=findings,
            triage=tri,
            descriptions=descriptions,
            input={"content_hash": decoded.content_hash, "context": decoded.context.to_dict()},
            symptoms=sym,
            top_k=top_k,
            similar_cases=cases,
            knowledge=passages,
            context_note=note,
            timings_ms={k: round(v, 1) for k, v in timings.items()},
            embedding=emb,
        )

    def _scoring_embedding(
        self, pack: KnowledgePack, pixels: np.ndarray, emb: np.ndarray, timings: dict
    ) -> np.ndarray:
        """The embedding findings are scored on: the image's own, or for domains with
        ``test_time_flips`` the re-normalised mean over the image and its flips (as
        ``medlens calibrate`` and ``medlens eval`` score them). Domain detection and
        retrieval keep the plain embedding the indexes were built from."""
        flips = pack.domain.test_time_flips
        if not flips:
            return emb
        t = time.perf_counter()
        views = self.encoder.embed_images([zeroshot.flipped(pixels, f) for f in flips])
        timings["encode_flips"] = (time.perf_counter() - t) * 1000
        return zeroshot.ensemble(np.vstack([emb[None], views]))

    def _context(
        self, emb: np.ndarray, domain: str, finding_ids: list[str]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
        """Similar cases from the case library and knowledge passages for the top
        findings. Retrieval problems (e.g. the embedded store held by another process)
        never fail an analysis: they are reported in ``context_note``."""
        if not self.retrieval:
            return [], [], "retrieval disabled"
        from medlens import retrieval

        enc = self.encoder
        try:
            cases = retrieval.similar_cases(emb, domain, enc.fingerprint, k=5)
            passages = retrieval.knowledge_passages(
                enc, finding_ids, domain, k_per_finding=2, query_embedding=emb
            )
        except MedLensError as exc:
            log.warning("retrieval unavailable: %s", type(exc).__name__)
            return [], [], f"similar cases and knowledge passages unavailable: {exc}"
        note = None if cases else "no case library for this model and domain (medlens index)"
        return cases, passages, note

    def _score(
        self, pack: KnowledgePack, emb: np.ndarray, symptoms: str | None
    ) -> tuple[dict[str, float], dict[str, Any] | None]:
        enc = self.encoder
        scale = float(enc.logit_scale)
        temperature = float(self.calibration().get("temperature", {}).get(pack.id, 1.0))
        class_emb = zeroshot.finding_embeddings(enc, pack, self.cache_dir)
        logits = zeroshot.similarity_logits(emb, class_emb, scale)
        if pack.task == "single_label":  # prior correction fitted with the temperature
            logits = logits + bias_vector(self.calibration(), pack.id, pack.finding_ids)
        ref_logit = np.zeros(1, dtype=np.float32)
        if pack.task == "multi_label":
            ref = zeroshot.reference_embedding(enc, pack, self.cache_dir)
            ref_logit = np.array([scale * float(emb @ ref)], dtype=np.float32)
        sym_info = None
        if symptoms is not None:
            # Symptom text scored against the same finding prompts (text→text) and mixed
            # log-linearly with a fixed weight until a trained fusion exists. For
            # multi-label domains the symptom term is taken relative to the reference.
            sym_emb = enc.embed_texts([symptoms])[0]
            sym_logits = zeroshot.similarity_logits(sym_emb, class_emb, scale)
            sym_ref = 0.0
            if pack.task == "multi_label":
                sym_ref = scale * float(sym_emb @ ref)
            logits = logits + self.symptom_weight * (sym_logits - sym_ref)
            sym_p = zeroshot.single_label_probs(sym_logits)[0]
            order = np.argsort(-sym_p)[:3]
            sym_info = {
                "sha256": text_hash(symptoms),
                "weight": self.symptom_weight,
                "closest_findings": [
                    {
                        "id": pack.findings[i].id,
                        "name": pack.findings[i].name,
                        "probability": round(float(sym_p[i]), 4),
                    }
                    for i in order
                ],
            }
        if pack.task == "single_label":
            p = zeroshot.single_label_probs(logits, temperature)[0]
        else:
            p = zeroshot.multi_label_probs(logits, ref_logit, temperature)[0]
        return {f.id: float(pi) for f, pi in zip(pack.findings, p, strict=True)}, sym_info

    @staticmethod
    def _finding_row(pack: KnowledgePack, fid: str, p: float) -> dict[str, Any]:
        f = pack.finding(fid)
        return {
            "id": f.id,
            "name": f.name,
            "probability": round(p, 4),
            "icd10": list(f.icd10),
            "snomed": f.snomed,
            "risk": f.risk,
        }

    @staticmethod
    def _description(pack: KnowledgePack, fid: str) -> dict[str, Any]:
        f = pack.finding(fid)
        return {
            "id": f.id,
            "name": f.name,
            "sections": f.description.sections(),
            "next_step": f.next_step,
            "source": f"medlens/knowledge/{pack.id}.yaml#{f.id}",
        }
