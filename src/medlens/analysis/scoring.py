"""The one rule from an image embedding (+ symptom text) to calibrated probabilities.

Used by ``MedLens.analyze``, every evaluation protocol, ``medlens calibrate`` and
training-time validation, so a number measured anywhere is the number a user gets.

The rule, for a knowledge pack with findings k = 1..K and an encoder with logit scale s:

- finding logits ``z_k = s · cos(image, prompts_k)``; for multi-label packs relative to
  the pack's "normal study" reference: ``z_k = s · (cos(image, prompts_k) − cos(image, ref))``;
- with symptom text, the same logits of the text embedding are added with a weight
  (``fuse``);
- calibration (``models.card.Calibration``): a differential is
  ``softmax((z + b) / T)`` over the findings in play, per-finding scores are
  ``sigmoid(z / T)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlens.analysis import zeroshot
from medlens.errors import ModelUnavailable
from medlens.knowledge import KnowledgePack
from medlens.models.base import Encoder
from medlens.models.card import Calibration

# Weight of the symptom-text logits in the fixed late fusion (untrained; a learned
# fusion replaces it). The pipeline's default and the evaluation's "fusion" modality.
SYMPTOM_WEIGHT = 0.5


def logits_from(
    emb: np.ndarray, finding_emb: np.ndarray, scale: float, reference_emb: np.ndarray | None = None
) -> np.ndarray:
    """(N, K) finding logits from unit embeddings: ``scale · cos``, minus the scaled
    similarity to the reference ("normal study") when one is given (multi-label)."""
    emb = np.atleast_2d(emb)
    z = zeroshot.similarity_logits(emb, finding_emb, scale)
    if reference_emb is not None:
        z = z - float(scale) * (emb @ np.asarray(reference_emb).reshape(-1, 1))
    return z


def finding_logits(
    encoder: Encoder, pack: KnowledgePack, emb: np.ndarray, prompt_cache: Path | None = None
) -> np.ndarray:
    """(N, K) logits of every finding of ``pack`` for embeddings ``emb`` (image or text),
    relative to the reference for multi-label packs."""
    cls = zeroshot.finding_embeddings(encoder, pack, prompt_cache)
    ref = (
        zeroshot.reference_embedding(encoder, pack, prompt_cache)
        if pack.task == "multi_label"
        else None
    )
    return logits_from(emb, cls, float(encoder.logit_scale), ref)


def fuse(image_logits: np.ndarray, symptom_logits: np.ndarray | None, weight: float) -> np.ndarray:
    """Late fusion of image and symptom-text logits (log-linear, fixed weight)."""
    if symptom_logits is None:
        return image_logits
    return image_logits + float(weight) * symptom_logits


def probabilities(
    logits: np.ndarray,
    task: str,
    temperature: float = 1.0,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """(N, K) probabilities from finding logits: a softmax over the K columns given for
    a differential (single-label), an independent sigmoid per finding otherwise."""
    if task == "single_label":
        z = logits if bias is None else logits + bias
        return zeroshot.single_label_probs(z, temperature)
    return zeroshot.sigmoid(np.atleast_2d(logits) / float(temperature))


def calibrated(
    logits: np.ndarray,
    pack: KnowledgePack,
    calibration: Calibration,
    columns: list[int] | None = None,
) -> np.ndarray:
    """Probabilities as the model's calibration defines them; with ``columns`` (finding
    indices) the differential is restricted to those findings (a dataset's candidates)."""
    t = calibration.temperature_for(pack.id)
    bias = calibration.bias_for(pack.id, pack.finding_ids) if pack.task == "single_label" else None
    if columns is not None:
        logits = np.atleast_2d(logits)[:, columns]
        bias = None if bias is None else bias[columns]
    return probabilities(logits, pack.task, t, bias)


@dataclass
class Scores:
    """One image's scores for every finding of a pack, in the pack's order."""

    logits: np.ndarray  # (K,) fused, uncalibrated
    probabilities: np.ndarray  # (K,) calibrated
    symptom_probabilities: np.ndarray | None  # (K,) text alone, softmax at T = 1

    def as_dict(self, pack: KnowledgePack) -> dict[str, float]:
        return {f.id: float(p) for f, p in zip(pack.findings, self.probabilities, strict=True)}


def score(
    encoder: Encoder,
    pack: KnowledgePack,
    image_emb: np.ndarray,
    calibration: Calibration,
    *,
    symptom_emb: np.ndarray | None = None,
    symptom_weight: float = 0.0,
    prompt_cache: Path | None = None,
) -> Scores:
    """Calibrated probabilities of every finding of ``pack`` for one image embedding and,
    optionally, one symptom-text embedding."""
    z_img = finding_logits(encoder, pack, image_emb, prompt_cache)[0]
    z_sym = None
    sym_p = None
    if symptom_emb is not None:
        z_sym = finding_logits(encoder, pack, symptom_emb, prompt_cache)[0]
        sym_p = zeroshot.single_label_probs(z_sym)[0]
    z = fuse(z_img, z_sym, symptom_weight)
    p = calibrated(z, pack, calibration)[0]
    if not np.isfinite(p).all():  # corrupted weights or cache: never a triage
        raise ModelUnavailable(
            f"the model produced non-finite scores for {pack.id} (corrupted weights, prompt "
            "cache or calibration?): no result; reinstall the model or run "
            "`medlens cache prune --all`"
        )
    return Scores(z, p, sym_p)
