"""Learned fusion of the calibrated image logits with the clinical context (issue 15).

The rule, for a pack with findings k = 1..K, calibrated image logits ``u_k`` (what
``scoring.calibrated`` turns into the image-only differential) and the encoded context
``c`` (``encode``; C numbers):

    fused logits  ``u_k + (W c)_k``,  probabilities ``softmax`` over the findings in play.

So the context acts as a learned log-likelihood ratio on top of the image: with no
context (c = 0) the result *is* the image-only differential, each known field adds its
own evidence, and an unknown field adds none. Unknown is encoded as 0 with no
missingness indicator, so the head cannot learn "field missing → diagnosis X"
(PAD-UFES-20's Fitzpatrick and sex are missing for exactly the rows of some diagnoses;
``benchmarks/fusion.py`` measures what indicators would leak). W is fitted by
``medlens train fusion`` (``training.fusion``) on the validation splits of the pack's
training datasets: images the image model never trained on, so ``u`` is as reliable
there as on a new patient.

Fields without training data anywhere (duration) are parsed and shown but not encoded.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens.analysis.context import ClinicalContext
from medlens.errors import ModelUnavailable
from medlens.knowledge.schema import ContextVocabulary
from medlens.models.card import ARTIFACT_ERRORS, PACKAGED_CARDS, write_checked_npz

FUSION_FORMAT = "medlens-fusion-head/1"
# Centre and scale of the numeric fields (fixed, so an encoding never depends on the
# data it was fitted on): age in years, log diameter in mm, Fitzpatrick type.
AGE_CENTRE, AGE_SCALE = 55.0, 20.0
LOG_DIAMETER_CENTRE, LOG_DIAMETER_SCALE = math.log(8.0), 0.6
FITZPATRICK_CENTRE = 2.5
# Fields the head may encode, in feature order; a head stores the subset it uses.
FIELDS = ("age", "sex", "site", "fitzpatrick", "diameter_mm", "history")


def feature_names(vocab: ContextVocabulary, fields: tuple[str, ...] = FIELDS) -> list[str]:
    """Names of the encoded features, in order (``encode``)."""
    names: list[str] = []
    for f in fields:
        if f == "age":
            names += ["age", "age^2"]
        elif f == "sex":
            names.append("sex(female=+1)")
        elif f == "site":
            names += [f"site={g}" for g in vocab.site_groups()]
        elif f == "fitzpatrick":
            names.append("fitzpatrick")
        elif f == "diameter_mm":
            names.append("log_diameter")
        elif f == "history":
            names += [f"history.{t.id}" for t in vocab.history]
        else:
            raise ValueError(f"unknown fusion field {f!r}")
    return names


def encode(
    ctx: ClinicalContext, vocab: ContextVocabulary, fields: tuple[str, ...] = FIELDS
) -> np.ndarray:
    """(C,) numbers for ``ctx``: 0 wherever a field is unknown. Yes/no and female/male
    are ±1, body sites a one-hot over the pack's site groups, numbers centred and
    scaled by fixed constants."""
    out: list[float] = []
    for f in fields:
        if f == "age":
            a = 0.0 if ctx.age is None else (ctx.age - AGE_CENTRE) / AGE_SCALE
            out += [a, a * a]
        elif f == "sex":
            out.append({"female": 1.0, "male": -1.0}.get(ctx.sex or "", 0.0))
        elif f == "site":
            groups = vocab.site_groups()
            onehot = [0.0] * len(groups)
            if ctx.site is not None:
                g = next(t.group for t in vocab.body_sites if t.id == ctx.site)
                onehot[groups.index(g)] = 1.0
            out += onehot
        elif f == "fitzpatrick":
            out.append(0.0 if ctx.fitzpatrick is None else ctx.fitzpatrick - FITZPATRICK_CENTRE)
        elif f == "diameter_mm":
            d = ctx.diameter_mm
            out.append(
                0.0 if d is None else (math.log(d) - LOG_DIAMETER_CENTRE) / LOG_DIAMETER_SCALE
            )
        elif f == "history":
            out += [
                0.0 if t.id not in ctx.history else (1.0 if ctx.history[t.id] else -1.0)
                for t in vocab.history
            ]
        else:
            raise ValueError(f"unknown fusion field {f!r}")
    return np.asarray(out, dtype=np.float64)


def used_fields(ctx: ClinicalContext, fields: tuple[str, ...]) -> list[str]:
    """The given fields of ``ctx`` a head with ``fields`` actually uses."""
    return [g for g in ctx.given() if g.split(".")[0] in fields]


UNMEASURED_DERMOSCOPY_WEIGHT = 0.5  # the equal mean, where no validation pairs were fitted


@dataclass(frozen=True)
class FusionHead:
    """W (K × C) for one model fingerprint and domain; rows in ``findings`` order."""

    fingerprint: str
    domain: str
    fields: tuple[str, ...]
    features: tuple[str, ...]
    findings: tuple[str, ...]
    weight: np.ndarray  # (K, C)
    info: dict[str, Any] = field(default_factory=dict)
    # A clinical photo + dermoscopy pair is scored on (1 - a)·z_clinical + a·z_dermoscopy;
    # a is fitted on validation pairs (Derm7pt) by ``training.fusion.fit_dermoscopy_weight``.
    dermoscopy_weight: float = UNMEASURED_DERMOSCOPY_WEIGHT

    def evidence(self, ctx: ClinicalContext, vocab: ContextVocabulary) -> np.ndarray:
        """(K,) logit shift the context adds to the calibrated image logits."""
        c = encode(ctx, vocab, self.fields)
        if c.shape[0] != self.weight.shape[1]:
            raise ModelUnavailable(
                f"the fusion head for {self.domain} encodes {self.weight.shape[1]} context "
                f"features but the knowledge pack now gives {c.shape[0]}: retrain it with "
                "`medlens train fusion`"
            )
        return self.weight @ c

    def shift_for(self, finding_ids: list[str], ctx: ClinicalContext, vocab: ContextVocabulary):
        """(len(finding_ids),) shift in the order of ``finding_ids``; 0 for findings the
        head has no row for (no training data: the context says nothing about them)."""
        ev = self.evidence(ctx, vocab)
        row = {f: i for i, f in enumerate(self.findings)}
        return np.array([ev[row[f]] if f in row else 0.0 for f in finding_ids])


def fusion_path(cards_dir: Path, fingerprint: str, domain: str) -> Path:
    return Path(cards_dir) / f"{fingerprint}.{domain}.fusion.npz"


def _checksum(meta_json: bytes, weight: np.ndarray) -> str:
    h = hashlib.sha256(meta_json)
    h.update(np.ascontiguousarray(weight, dtype=np.float64).tobytes())
    return h.hexdigest()


def write_head(head: FusionHead, cards_dir: Path) -> Path:
    """Write ``head`` atomically with a checksum ``read_head`` verifies."""
    meta = {
        "format": FUSION_FORMAT,
        "fingerprint": head.fingerprint,
        "domain": head.domain,
        "fields": list(head.fields),
        "features": list(head.features),
        "findings": list(head.findings),
        "info": head.info,
        "dermoscopy_weight": head.dermoscopy_weight,
    }
    meta_json = json.dumps(meta, sort_keys=True).encode()
    weight = np.asarray(head.weight, dtype=np.float64)
    path = fusion_path(cards_dir, head.fingerprint, head.domain)
    return write_checked_npz(path, meta_json, _checksum(meta_json, weight), {"weight": weight})


def read_head(path: Path) -> FusionHead:
    """Load and verify a head; anything unreadable, altered or non-finite is
    ``ModelUnavailable`` (a broken head never moves a differential)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta_json = z["meta"].tobytes()
            checksum = z["checksum"].tobytes().decode()
            weight = z["weight"].astype(np.float64)
        meta = json.loads(meta_json)
        if meta.get("format") != FUSION_FORMAT or checksum != _checksum(meta_json, weight):
            raise ValueError("checksum or format mismatch")
        head = FusionHead(
            fingerprint=meta["fingerprint"],
            domain=meta["domain"],
            fields=tuple(meta["fields"]),
            features=tuple(meta["features"]),
            findings=tuple(meta["findings"]),
            weight=weight,
            info=meta.get("info", {}),
            dermoscopy_weight=float(meta.get("dermoscopy_weight", UNMEASURED_DERMOSCOPY_WEIGHT)),
        )
        if not 0.0 <= head.dermoscopy_weight <= 1.0:
            raise ValueError(f"dermoscopy weight {head.dermoscopy_weight} outside [0, 1]")
        if weight.shape != (len(head.findings), len(head.features)):
            raise ValueError(f"weight shape {weight.shape} does not match its names")
        if not np.isfinite(weight).all():
            raise ValueError("non-finite weights")
    except ARTIFACT_ERRORS as exc:
        raise ModelUnavailable(
            f"the fusion head {path} is unreadable or corrupt ({exc}); delete it and re-run "
            "`medlens train fusion`"
        ) from None
    return head


def find_head(fingerprint: str, domain: str, cards_dir: Path | None) -> FusionHead | None:
    """The head for ``fingerprint`` and ``domain``: MEDLENS_HOME/cards first, then the
    ones shipped with MedLens; None when there is none (context is then recorded but
    cannot move the differential, and the analysis says so)."""
    for folder in (cards_dir, PACKAGED_CARDS):
        if folder is None:
            continue
        path = fusion_path(folder, fingerprint, domain)
        if path.is_file():
            head = read_head(path)
            if head.fingerprint == fingerprint and head.domain == domain:
                return head
    return None


# ----------------------------------------------------------------- what the user sees

# Disagreement: the image's top finding has at least this probability, and the context
# alone makes another finding at least e^DISAGREE_NATS times likelier relative to it.
DISAGREE_IMAGE_P = 0.5
DISAGREE_NATS = 1.0
REPORTED_AGE_CAP = 90  # ages above 89 are identifiers (HIPAA Safe Harbor): report "90"


def context_values(ctx: ClinicalContext) -> dict[str, Any]:
    """The known fields of ``ctx`` for the result JSON (age capped at 90)."""
    out: dict[str, Any] = {}
    for f in ("age", "sex", "site", "fitzpatrick", "diameter_mm", "duration_days"):
        v = getattr(ctx, f)
        if v is not None:
            out[f] = min(round(v), REPORTED_AGE_CAP) if f == "age" else v
    if ctx.history:
        out["history"] = {k: ctx.history[k] for k in sorted(ctx.history)}
    return out


def effect(
    finding_ids: list[str], names: list[str], p_image: np.ndarray, p_fused: np.ndarray, top: int = 3
) -> list[dict[str, Any]]:
    """The findings that lead either differential (up to ``top`` of each), image alone vs
    with the context."""
    order = list(dict.fromkeys([*np.argsort(-p_fused)[:top], *np.argsort(-p_image)[:top]]))
    return [
        {
            "id": finding_ids[i],
            "name": names[i],
            "image_only": round(float(p_image[i]), 4),
            "with_context": round(float(p_fused[i]), 4),
        }
        for i in order
    ]


def disagreement(
    finding_ids: list[str], names: list[str], p_image: np.ndarray, shift: np.ndarray
) -> str | None:
    """A sentence when the image points confidently to one finding and the context alone
    favours another by a clear margin (``DISAGREE_*``); None otherwise. Fusion would
    average the two silently; a clinician should see the conflict."""
    a = int(np.argmax(p_image))
    if p_image[a] < DISAGREE_IMAGE_P:
        return None
    b = int(np.argmax(shift))
    if b == a or shift[b] - shift[a] < DISAGREE_NATS:
        return None
    return (
        f"The image points to {names[a]} ({p_image[a]:.0%}), but the clinical context favours "
        f"{names[b]} (about {math.exp(shift[b] - shift[a]):.0f}× likelier relative to "
        f"{names[a]} than without it): review the image and the history together."
    )
