"""The MedLens facade: the one place where the flow of an analysis is wired.

decode (io) → quality gate → one encoder forward → domain, admitted by the
out-of-distribution gate (``analysis.ood``) or abstention → zero-shot logits (+ symptom
evidence) → probabilities (+ the clinical context, through a learned fusion head) →
triage → descriptions of the top findings → an ``Analysis`` (JSON-serialisable).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens.analysis import domain as domain_mod
from medlens.analysis import fusion, ood, scoring
from medlens.analysis.context import ClinicalContext, build_context, given_fields, merge_parsed
from medlens.analysis.result import (  # noqa: F401  (DISCLAIMER, SCHEMA_VERSION re-exported)
    DISCLAIMER,
    SCHEMA_VERSION,
    Analysis,
)
from medlens.analysis.symptoms import clean_symptoms, text_hash
from medlens.analysis.triage import triage
from medlens.config import Settings, get_settings
from medlens.embeddings import is_feature_encoder
from medlens.errors import ConfigError, InputError, MedLensError, OutOfDomain
from medlens.io import DecodedImage, load_image
from medlens.knowledge import RISK_ORDER, KnowledgePack, domains, load_domain, use_pack_dirs
from medlens.models.base import ensemble, flipped
from medlens.models.card import ModelCard, card_for

log = logging.getLogger("medlens")


@dataclass
class _ContextScores:
    """The context part of one analysis: the JSON summary and, when the context moved
    the differential, the image-only probabilities (for the triage floor)."""

    summary: dict[str, Any]
    image_probabilities: dict[str, float] | None


@dataclass
class Admission:
    """What the gate before scoring decided for one image (``MedLens.admit``)."""

    domain: str
    source: str  # "given" | "dicom" | "image"
    gate: ood.Gate
    embedding: np.ndarray
    domain_scores: dict[str, float]
    # Embeddings of the flipped views batched into the same forward pass (``flips``).
    flip_embeddings: dict[str, np.ndarray] = field(default_factory=dict)


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
        self._fusion_heads: dict[str, fusion.FusionHead | None] = {}

    @property
    def encoder(self):
        if self._encoder is None:
            from medlens.models.registry import load_analysis_encoder

            self._encoder = load_analysis_encoder(
                self.model_name,
                device=self.device,
                cache_dir=self.settings.cache_dir,
                onnx=self.settings.onnx_engine,
            )
        return self._encoder

    @property
    def torch_encoder(self):
        """The encoder as a torch module (explanations need gradients): the analysis
        encoder itself, or the torch model behind its ONNX engine, loaded on first use."""
        return getattr(self.encoder, "torch_encoder", self.encoder)

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

    def fusion_head(self, pack: KnowledgePack) -> fusion.FusionHead | None:
        """The context-fusion head of ``pack`` for this encoder, looked up once."""
        if pack.id not in self._fusion_heads:
            self._fusion_heads[pack.id] = (
                fusion.find_head(self.encoder.fingerprint, pack.id, self.settings.cards_dir)
                if pack.domain.context is not None
                else None
            )
        return self._fusion_heads[pack.id]

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
        context: ClinicalContext | Mapping[str, Any] | None = None,
        domain: str = "auto",
        top_k: int = 5,
        filename: str | None = None,
        dermoscopy: str | Path | bytes | DecodedImage | None = None,
    ) -> Analysis:
        """Analyze one image. ``context``: what is known about the patient and lesion
        (a ``ClinicalContext``, or a mapping of its user-facing fields: age, sex, site,
        fitzpatrick, diameter_mm, duration_days, history); symptom text is parsed into
        the same fields where the domain has a context vocabulary. ``dermoscopy``: the
        dermoscopy image of the lesion that ``image`` (a clinical photo) shows, in a
        domain whose pack allows the pair; it passes the same gate in the first image's
        domain, and the findings are scored on the two views' logits weighted as the
        fusion head says (fitted on validation pairs)."""
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
        flips = domain_mod.likely_flips(decoded.pixels, domain, decoded.context)
        adm = self.admit(decoded, domain, timings, flips=flips)
        emb, chosen, source, gate = adm.embedding, adm.domain, adm.source, adm.gate
        domain_scores = adm.domain_scores
        t2 = time.perf_counter()
        pack = load_domain(chosen)
        score_emb = self._scoring_embedding(pack, decoded.pixels, adm, timings)
        derm, view_weights = None, None
        if dermoscopy is not None:
            derm, derm_emb = self._dermoscopy_view(pack, dermoscopy, gate, timings)
            score_emb = np.vstack([score_emb, derm_emb])
            view_weights = (1 - derm["weight"], derm["weight"])
        ctx = self._clinical_context(pack, context, symptoms)
        probs, sym, ctx_info = self._score(pack, score_emb, symptoms, ctx, view_weights)
        thresholds = self.card.calibration.thresholds_for(pack.id)
        supervised: set[str] = set()
        if (clf := self.classifiers.get(pack.id)) is not None:
            t = time.perf_counter()
            by_clf = clf.finding_probabilities([decoded.pixels])[0]
            probs = scoring.with_supervised(pack, probs, by_clf)
            thresholds = {**thresholds, **clf.operating_points}  # its operating points
            supervised = set(by_clf)
            timings["classifier"] = (time.perf_counter() - t) * 1000
        tri = self._triage(pack, probs, thresholds, ctx_info)
        timings["score"] = (time.perf_counter() - t2) * 1000
        ranked = sorted(probs, key=probs.get, reverse=True)

        t3 = time.perf_counter()
        cases, passages, note = self.retrieval_context(emb, pack.id, ranked[: min(3, top_k)])
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
            input={
                "content_hash": decoded.content_hash,
                "context": decoded.context.to_dict(),
                "dermoscopy": derm,
            },
            quality=gate.to_dict(),
            symptoms=sym,
            context=ctx_info.summary if ctx_info is not None else None,
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
        emb = self._encode([pixels])[0][0]
        domain_mod.domain_scores(emb, self.encoder, self.cache_dir)
        for d in domains():
            pack = load_domain(d)
            self._score(pack, emb, None, None)
            self.fusion_head(pack)

    def admit(
        self,
        decoded: DecodedImage,
        domain: str = "auto",
        timings: dict | None = None,
        *,
        flips: Sequence[str] = (),
    ) -> Admission:
        """The gate before any score: DICOM header rules, pixel quality, one forward pass,
        domain candidates and the out-of-distribution check (``analysis.ood``). Raises
        ``OutOfDomain`` (MedLens abstains) or returns what the analysis goes on with.
        ``flips``: mirrored views to embed in the same forward pass, so that a domain that
        scores them needs no second one (``analysis.domain.likely_flips``); the gate sees
        the image only. ``benchmarks/ood_gate.py`` measures exactly this."""
        timings = {} if timings is None else timings
        if (why := domain_mod.unsupported_dicom(decoded.context)) is not None:
            raise OutOfDomain(f"{why}: MedLens abstains rather than guess")
        ctx = decoded.context
        gate = ood.Gate(
            warnings=ood.check_pixels(decoded.pixels)
            + ood.frames_note(ctx.frames, ctx.source_format)
        )
        t1 = time.perf_counter()
        views = [decoded.pixels, *(flipped(decoded.pixels, f) for f in flips)]
        embs, feats = self._encode(views)
        emb = embs[0]
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
            flip_embeddings=dict(zip(flips, embs[1:], strict=True)),
        )

    def _encode(self, views: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """One forward pass over an image's views (the image first): their embeddings
        and, when the gate's reference uses them and the encoder exposes them (lite), the
        image's tower features they were computed from (``embed_images`` is exactly
        features → heads)."""
        enc = self.encoder
        ref = self.card.ood
        wants_features = ref is not None and ref.uses_features
        if hasattr(type(enc), "embed_images_and_features"):  # the ONNX engine: one call
            embs, feats = enc.embed_images_and_features(views, batch_size=len(views))
            return embs, (feats[:1] if wants_features else None)
        if wants_features and is_feature_encoder(enc):
            import torch

            feats = enc.image_features(views, batch_size=len(views))
            with torch.inference_mode():
                emb, _ = enc.embed_from_features(img_feats=feats)
            return emb.float().cpu().numpy(), feats[:1].numpy()
        return enc.embed_images(views, batch_size=len(views)), None

    def _dermoscopy_view(
        self,
        pack: KnowledgePack,
        image: str | Path | bytes | DecodedImage,
        gate: ood.Gate,
        timings: dict,
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Decode and admit the dermoscopy view in ``pack``'s domain (the same quality
        and out-of-distribution gate: a view that fails it ends the analysis in an
        abstention, never in a one-view result that looks like a pair). Its warnings join
        ``gate``'s; returns its ``input.dermoscopy`` record and scoring embedding."""
        if not pack.domain.paired_dermoscopy:
            raise ConfigError(
                f"the {pack.id} domain takes one image per analysis (a dermoscopy image "
                "was given as well)"
            )
        t = time.perf_counter()
        try:
            decoded = self.decode(image)
            adm = self.admit(decoded, pack.id, flips=pack.domain.test_time_flips)
        except InputError as exc:  # the same error, saying which image it is about
            raise type(exc)(f"dermoscopy image: {exc}") from exc
        gate.warnings.extend(f"dermoscopy image: {w}" for w in adm.gate.warnings)
        emb = self._scoring_embedding(pack, decoded.pixels, adm, {})
        head = self.fusion_head(pack)
        timings["dermoscopy"] = (time.perf_counter() - t) * 1000
        record = {
            "content_hash": decoded.content_hash,
            "context": decoded.context.to_dict(),
            "weight": fusion.UNMEASURED_DERMOSCOPY_WEIGHT,
            "weight_source": "default",
        }
        if head is not None:
            record["weight"] = head.dermoscopy_weight
            record["weight_source"] = f"{head.fingerprint}/{head.domain}"
        return record, emb

    def _scoring_embedding(
        self, pack: KnowledgePack, pixels: np.ndarray, adm: Admission, timings: dict
    ) -> np.ndarray:
        """The embedding findings are scored on: the image's own, or for domains with
        ``test_time_flips`` the re-normalised mean over the image and its flips (as
        ``medlens calibrate`` and ``medlens eval`` score them), from the admission's
        forward pass when it carried them, else from a second one. Domain detection and
        retrieval keep the plain embedding the indexes were built from."""
        flips = pack.domain.test_time_flips
        if not flips:
            return adm.embedding
        missing = [f for f in flips if f not in adm.flip_embeddings]
        if missing:
            t = time.perf_counter()
            extra = self.encoder.embed_images([flipped(pixels, f) for f in missing])
            timings["encode_flips"] = (time.perf_counter() - t) * 1000
            adm.flip_embeddings.update(zip(missing, extra, strict=True))
        views = [adm.flip_embeddings[f] for f in flips]
        return ensemble(np.vstack([adm.embedding[None], *views]))

    def retrieval_context(
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

    def _clinical_context(
        self,
        pack: KnowledgePack,
        context: ClinicalContext | Mapping[str, Any] | None,
        symptoms: str | None,
    ) -> ClinicalContext | None:
        """The validated context: the given fields, completed by what the symptom text
        states (where the pack has a context vocabulary); None when nothing is known."""
        vocab = pack.domain.context
        if context is not None and not isinstance(context, ClinicalContext):
            context = given_fields(**dict(context)) or {}  # an unknown field name is an error
        if vocab is None:  # recorded as not understood, never silently dropped
            if context is None:
                return None
            keys = context.given() if isinstance(context, ClinicalContext) else sorted(context)
            return ClinicalContext(not_understood=tuple(keys)) if keys else None
        if context is not None and not isinstance(context, ClinicalContext):
            context = build_context(vocab, **context)
        if symptoms is not None:
            from medlens.analysis.context_text import parse_symptoms

            parsed = parse_symptoms(symptoms, vocab).context
            context = merge_parsed(context or ClinicalContext(), parsed)
        return context

    def _score(
        self,
        pack: KnowledgePack,
        emb: np.ndarray,
        symptoms: str | None,
        ctx: ClinicalContext | None,
        view_weights: Sequence[float] | None = None,
    ) -> tuple[dict[str, float], dict[str, Any] | None, _ContextScores | None]:
        """Calibrated probabilities by the one scoring rule (``analysis.scoring``).

        Symptom text: where the pack has a context vocabulary it is parsed into context
        fields (``_clinical_context``) and the learned fusion head weighs them; its
        embedding is still compared with the findings and shown ("closest findings"),
        but no longer mixed into the differential (a fixed mix moved it the wrong way).
        Packs without a context vocabulary keep the fixed text mix."""
        mixed = pack.domain.context is None
        weight = self.symptom_weight if mixed else 0.0
        sym_emb = self.encoder.embed_texts([symptoms]) if symptoms is not None else None
        head = self.fusion_head(pack) if ctx is not None and not ctx.empty else None
        shift = None
        if head is not None and fusion.used_fields(ctx, head.fields):
            shift = head.shift_for(pack.finding_ids, ctx, pack.domain.context)
        s = scoring.score(
            self.encoder,
            pack,
            emb,
            self.card.calibration,
            symptom_emb=sym_emb,
            symptom_weight=weight,
            prompt_cache=self.cache_dir,
            context_shift=shift,
            view_weights=view_weights,
        )
        sym_info = None
        if s.symptom_probabilities is not None:
            order = np.argsort(-s.symptom_probabilities)[:3]
            sym_info = {
                "sha256": text_hash(symptoms, self.settings),
                "weight": weight,
                "closest_findings": [
                    {
                        "id": pack.findings[i].id,
                        "name": pack.findings[i].name,
                        "probability": round(float(s.symptom_probabilities[i]), 4),
                    }
                    for i in order
                ],
            }
        ctx_info = None if ctx is None else self._context_summary(pack, ctx, head, s, shift)
        return s.as_dict(pack), sym_info, ctx_info

    def _context_summary(
        self,
        pack: KnowledgePack,
        ctx: ClinicalContext,
        head: fusion.FusionHead | None,
        s: scoring.Scores,
        shift: np.ndarray | None,
    ) -> _ContextScores:
        ids = pack.finding_ids
        names = [f.name for f in pack.findings]
        used = fusion.used_fields(ctx, head.fields) if head is not None else []
        note = None
        if pack.domain.context is None:
            note = f"the {pack.id} domain takes no clinical context: it was not used"
        elif ctx.empty:
            note = "no clinical context was given or recognised"
        elif head is None:
            note = (
                f"no fusion head for this model and the {pack.id} domain "
                "(`medlens train fusion`): the context is recorded but cannot move the "
                "differential"
            )
        elif not used:
            note = "none of the given fields is one the fusion head was trained on"
        summary: dict[str, Any] = {
            "given": [g for g in ctx.given() if g not in ctx.parsed],
            "parsed": list(ctx.parsed),
            "values": fusion.context_values(ctx),
            "not_understood": list(ctx.not_understood),
            "conflicts": list(ctx.conflicts),
            "used": used,
            "fusion": f"{head.fingerprint}/{head.domain}" if head is not None else None,
            "note": note,
        }
        p_img = None
        if shift is not None and s.image_probabilities is not None:
            p_img = {f: float(p) for f, p in zip(ids, s.image_probabilities, strict=True)}
            summary["effect"] = fusion.effect(ids, names, s.image_probabilities, s.probabilities)
            summary["disagreement"] = fusion.disagreement(ids, names, s.image_probabilities, shift)
        return _ContextScores(summary, p_img)

    def _triage(
        self,
        pack: KnowledgePack,
        probs: dict[str, float],
        thresholds: dict[str, float],
        ctx: _ContextScores | None,
    ):
        """Triage of the (fused) probabilities, never below the image's own: context may
        raise the urgency, never lower it (fusion must not cost sensitivity). A
        disagreement between image and context asks for review (at least "soon")."""
        tri = triage(pack, probs, thresholds)
        if ctx is None or ctx.image_probabilities is None:
            return tri
        alone = triage(pack, ctx.image_probabilities, thresholds)
        if RISK_ORDER[alone.level] > RISK_ORDER[tri.level]:
            tri = alone.model_copy(
                update={"reason": alone.reason + " (image alone; context never lowers a triage)"}
            )
        if (text := ctx.summary.get("disagreement")) is not None:
            level = tri.level if RISK_ORDER[tri.level] >= RISK_ORDER["soon"] else "soon"
            tri = tri.model_copy(
                update={"level": level, "review": True, "reason": f"{tri.reason}. {text}"}
            )
        return tri

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
