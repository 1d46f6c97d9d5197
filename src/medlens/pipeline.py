"""The MedLens facade: the one place where the flow of an analysis is wired.

decode (io) → quality gate → one encoder forward → domain, admitted by the
out-of-distribution gate (``analysis.ood``) or abstention → zero-shot logits (+ symptom
evidence) → probabilities → triage → descriptions of the top findings → an ``Analysis``
(JSON-serialisable).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medlens.analysis import domain as domain_mod
from medlens.analysis import ood, scoring
from medlens.analysis.result import (  # noqa: F401  (DISCLAIMER, SCHEMA_VERSION re-exported)
    DISCLAIMER,
    SCHEMA_VERSION,
    Analysis,
)
from medlens.analysis.symptoms import clean_symptoms, text_hash
from medlens.analysis.triage import triage
from medlens.config import Settings, get_settings
from medlens.embeddings import is_feature_encoder
from medlens.errors import ConfigError, MedLensError, OutOfDomain
from medlens.io import DecodedImage, load_image
from medlens.knowledge import KnowledgePack, domains, load_domain, use_pack_dirs
from medlens.models.base import ensemble, flipped
from medlens.models.card import ModelCard, card_for

log = logging.getLogger("medlens")


@dataclass
class Admission:
    """What the gate before scoring decided for one image (``MedLens.admit``)."""

    domain: str
    source: str  # "given" | "dicom" | "image"
    gate: ood.Gate
    embedding: np.ndarray
    domain_scores: dict[str, float]


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
        symptom_weight: float = scoring.SYMPTOM_WEIGHT,
        retrieval: bool = True,
        classifiers: Sequence[str] | None = None,
    ):
        self.settings = settings or get_settings()
        use_pack_dirs(self.settings.knowledge_dirs)
        self.model_name = model or self.settings.model
        self.device = device or self.settings.device
        self.symptom_weight = symptom_weight
        self.retrieval = retrieval
        self._encoder = None
        self._card: ModelCard | None = None
        self.classifier_specs = tuple(
            self.settings.classifiers if classifiers is None else classifiers
        )
        self._classifiers: dict[str, Any] | None = None

    @property
    def encoder(self):
        if self._encoder is None:
            from medlens.models import load_encoder

            self._encoder = load_encoder(self.model_name, device=self.device)
        return self._encoder

    @property
    def classifiers(self) -> dict[str, Any]:
        """Supervised classifiers by domain (``classifiers=`` / MEDLENS_CLASSIFIERS),
        loaded on first use; at most one per domain."""
        if self._classifiers is None:
            from medlens.models import load_classifier

            out: dict[str, Any] = {}
            for spec in self.classifier_specs:
                clf = load_classifier(spec, device=self.device)
                if clf.domain in out:
                    raise ConfigError(f"two classifiers for domain {clf.domain}: keep one")
                out[clf.domain] = clf
            self._classifiers = out
        return self._classifiers

    @property
    def cache_dir(self) -> Path:
        """The embedding cache (``medlens.embeddings``) prompt vectors are kept in."""
        return self.settings.cache_dir

    @property
    def card(self) -> ModelCard:
        """The encoder's model card (calibration, provenance), looked up once."""
        if self._card is None:
            self._card = card_for(self.encoder, self.settings.cards_dir)
        return self._card

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
            max_decode_bytes=self.settings.max_decode_bytes,
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
        if domain != "auto" and domain not in domains():
            raise ConfigError(
                f"unknown domain {domain!r}; choose one of {', '.join(('auto', *domains()))}"
            )
        if top_k < 1:
            raise ConfigError("top_k must be at least 1")
        symptoms = clean_symptoms(symptoms, self.settings.max_text_chars)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        decoded = self.decode(image, filename)
        timings["decode"] = (time.perf_counter() - t0) * 1000
        adm = self.admit(decoded, domain, timings)
        emb, chosen, source, gate = adm.embedding, adm.domain, adm.source, adm.gate
        domain_scores = adm.domain_scores
        t2 = time.perf_counter()
        pack = load_domain(chosen)
        score_emb = self._scoring_embedding(pack, decoded.pixels, emb, timings)
        probs, sym = self._score(pack, score_emb, symptoms)
        thresholds = self.card.calibration.thresholds_for(pack.id)
        supervised: set[str] = set()
        if (clf := self.classifiers.get(pack.id)) is not None:
            t = time.perf_counter()
            by_clf = clf.finding_probabilities([decoded.pixels])[0]
            probs = scoring.with_supervised(pack, probs, by_clf)
            thresholds = {**thresholds, **clf.operating_points}  # its operating points
            supervised = set(by_clf)
            timings["classifier"] = (time.perf_counter() - t) * 1000
        tri = triage(pack, probs, thresholds)
        timings["score"] = (time.perf_counter() - t2) * 1000
        ranked = sorted(probs, key=probs.get, reverse=True)

        t3 = time.perf_counter()
        cases, passages, note = self._context(emb, pack.id, ranked[: min(3, top_k)])
        timings["retrieval"] = (time.perf_counter() - t3) * 1000
        timings["total"] = (time.perf_counter() - t0) * 1000

        findings = [self._finding_row(pack, fid, probs[fid], fid in supervised) for fid in ranked]
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
            domain_detection={"source": source, "scores": domain_scores},
            model={
                "name": self.model_name,
                "fingerprint": self.encoder.fingerprint,
                "calibration": self.card.calibration.id,
                "classifier": f"{clf.name}@{clf.fingerprint}" if clf is not None else None,
            },
            findings=findings,
            triage=tri,
            descriptions=descriptions,
            input={"content_hash": decoded.content_hash, "context": decoded.context.to_dict()},
            quality=gate.to_dict(),
            symptoms=sym,
            top_k=top_k,
            similar_cases=cases,
            knowledge=passages,
            context_note=note,
            timings_ms={k: round(v, 1) for k, v in timings.items()},
            embedding=emb,
        )

    def warm(self) -> None:
        """Load the encoder, its model card and out-of-distribution reference, and every
        domain's prompt embeddings, so the first analysis is fast (the service calls this
        before it says ready). No analysis: a synthetic image would rightly abstain."""
        y, x = np.mgrid[0:224, 0:224]
        pixels = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
        emb, _ = self._encode(pixels)
        domain_mod.domain_scores(emb, self.encoder, self.cache_dir)
        for d in domains():
            self._score(load_domain(d), emb, None)

    def admit(
        self, decoded: DecodedImage, domain: str = "auto", timings: dict | None = None
    ) -> Admission:
        """The gate before any score: DICOM header rules, pixel quality, one forward pass,
        domain candidates and the out-of-distribution check (``analysis.ood``). Raises
        ``OutOfDomain`` (MedLens abstains) or returns what the analysis goes on with.
        ``benchmarks/ood_gate.py`` measures exactly this."""
        timings = {} if timings is None else timings
        if (why := domain_mod.unsupported_dicom(decoded.context)) is not None:
            raise OutOfDomain(f"{why}: MedLens abstains rather than guess")
        ctx = decoded.context
        gate = ood.Gate(
            warnings=ood.check_pixels(decoded.pixels)
            + ood.frames_note(ctx.frames, ctx.source_format)
        )
        t1 = time.perf_counter()
        emb, feats = self._encode(decoded.pixels)
        timings["encode"] = (time.perf_counter() - t1) * 1000
        t2 = time.perf_counter()
        scores = domain_mod.domain_scores(emb, self.encoder, self.cache_dir)[0]
        candidates, source = domain_mod.candidates(scores, domain, ctx)
        chosen = ood.choose_domain(
            self.card.ood, emb, candidates, gate, feats, header=source == "dicom"
        )
        timings["gate"] = (time.perf_counter() - t2) * 1000
        return Admission(
            domain=chosen,
            source=source,
            gate=gate,
            embedding=emb,
            domain_scores={d: round(float(s), 4) for d, s in zip(domains(), scores, strict=True)},
        )

    def _encode(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One forward pass: the embedding and, when the gate's reference uses them and
        the encoder exposes them (lite), the image tower's features it was computed
        from (``embed_images`` is exactly features → heads)."""
        enc = self.encoder
        ref = self.card.ood
        if ref is not None and ref.uses_features and is_feature_encoder(enc):
            import torch

            feats = enc.image_features([pixels])
            with torch.inference_mode():
                emb, _ = enc.embed_from_features(img_feats=feats)
            return emb.float().cpu().numpy()[0], feats.numpy()
        return enc.embed_images([pixels])[0], None

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
        views = self.encoder.embed_images([flipped(pixels, f) for f in flips])
        timings["encode_flips"] = (time.perf_counter() - t) * 1000
        return ensemble(np.vstack([emb[None], views]))

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
            cases = retrieval.similar_cases(
                emb, domain, enc.fingerprint, k=5, settings=self.settings
            )
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
        """Calibrated probabilities by the one scoring rule (``analysis.scoring``); the
        symptom text is embedded here and fused there."""
        sym_emb = self.encoder.embed_texts([symptoms]) if symptoms is not None else None
        s = scoring.score(
            self.encoder,
            pack,
            emb,
            self.card.calibration,
            symptom_emb=sym_emb,
            symptom_weight=self.symptom_weight,
            prompt_cache=self.cache_dir,
        )
        sym_info = None
        if s.symptom_probabilities is not None:
            order = np.argsort(-s.symptom_probabilities)[:3]
            sym_info = {
                "sha256": text_hash(symptoms, self.settings),
                "weight": self.symptom_weight,
                "closest_findings": [
                    {
                        "id": pack.findings[i].id,
                        "name": pack.findings[i].name,
                        "probability": round(float(s.symptom_probabilities[i]), 4),
                    }
                    for i in order
                ],
            }
        return s.as_dict(pack), sym_info

    @staticmethod
    def _finding_row(
        pack: KnowledgePack, fid: str, p: float, supervised: bool = False
    ) -> dict[str, Any]:
        f = pack.finding(fid)
        return {
            "source": "classifier" if supervised else "zero-shot",
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
