"""The one rule from an image embedding (+ symptom text) to calibrated probabilities.

Used by ``MedLens.analyze``, every evaluation protocol, ``medlens calibrate`` and
training-time validation, so a number measured anywhere is the number a user gets.

The rule, for a knowledge pack with findings k = 1..K and an encoder with logit scale s:

- finding logits ``z_k = s · cos(image, prompts_k)``; for multi-label packs relative to
  the pack's "normal study" reference: ``z_k = s · (cos(image, prompts_k) − cos(image, ref))``;
- with symptom text, the same logits of the text embedding are added with a weight
  (``fuse``) in domains without a clinical-context vocabulary; where the pack has one,
  the text is parsed into context fields instead (``analysis.context_text``);
- with clinical context, a learned fusion head's evidence is added to the calibrated
  logits (``calibrated(..., shift=)``, ``analysis.fusion``);
- calibration (``models.card.Calibration``): a differential is
  ``softmax((z + b) / T)`` over the findings in play, per-finding scores are
  ``sigmoid(z / T)``;
- consistency (multi-label packs): a finding that declares ``excludes`` in its pack
  ("no finding" excludes every other finding) is capped by the Fréchet bound
  ``p_k := min(p_k, 1 − max_{i ∈ excluded} p_i)`` (``consistent``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlens.analysis import zeroshot
from medlens.errors import ConfigError, ModelUnavailable
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
    cls, ref = zeroshot.scoring_embeddings(encoder, pack, prompt_cache)
    return logits_from(emb, cls, float(encoder.logit_scale), ref)


def fuse(image_logits: np.ndarray, symptom_logits: np.ndarray | None, weight: float) -> np.ndarray:
    """Late fusion of image and symptom-text logits (log-linear, fixed weight)."""
    if symptom_logits is None:
        return image_logits
    return image_logits + float(weight) * symptom_logits


Exclusions = Sequence[tuple[int, Sequence[int]]]


def consistent(p: np.ndarray, exclusions: Exclusions) -> np.ndarray:
    """(N, K) multi-label probabilities with every mutually exclusive pair made coherent.

    ``exclusions``: (k, excluded indices) from ``KnowledgePack.exclusions``. If finding k
    cannot co-occur with finding i, the event "k" lies inside "not i", so any joint
    distribution with these marginals has P(k) ≤ 1 − P(i) for every such i (the Fréchet
    bound). The rule ``p_k := min(p_k, 1 − max_i p_i)`` is the smallest change that
    restores it: it leaves p_k alone where nothing contradicts it, never touches the
    abnormal findings (whose calibrated probabilities drive triage), and is idempotent.
    Why not ``p_k · Π(1 − p_i)``: that assumes independent findings and shrinks "no
    finding" on every normal film where 18 findings each score a little.
    """
    if not exclusions:
        return p
    p = np.atleast_2d(p)
    out = p.copy()
    for k, others in exclusions:
        if len(others):
            out[:, k] = np.minimum(p[:, k], 1.0 - p[:, list(others)].max(axis=1))
    return out


def probabilities(
    logits: np.ndarray,
    task: str,
    temperature: float = 1.0,
    bias: np.ndarray | None = None,
    exclusions: Exclusions = (),
) -> np.ndarray:
    """(N, K) probabilities from finding logits: a softmax over the K columns given for
    a differential (single-label), an independent sigmoid per finding otherwise, made
    ``consistent`` with the pack's ``exclusions`` (column indices of ``logits``)."""
    if task == "single_label":
        z = logits if bias is None else logits + bias
        return zeroshot.single_label_probs(z, temperature)
    return consistent(zeroshot.sigmoid(np.atleast_2d(logits) / float(temperature)), exclusions)


def calibrated(
    logits: np.ndarray,
    pack: KnowledgePack,
    calibration: Calibration,
    columns: list[int] | None = None,
    shift: np.ndarray | None = None,
) -> np.ndarray:
    """Probabilities as the model's calibration defines them; with ``columns`` (finding
    indices) the differential is restricted to those findings (a dataset's candidates).

    ``shift`` ((K,) or (N, K), single-label only): the clinical-context evidence of a
    fusion head (``analysis.fusion``), added to the *calibrated* logits, so the
    differential is ``softmax((z + b) / T + shift)`` and no shift is the image alone.

    Multi-label: the consistency rule needs every finding, so it is applied to the full
    row before ``columns`` are taken; logits already cut to fewer columns than the pack
    has are scored without it (it never changes a finding that declares no ``excludes``).
    """
    t = calibration.temperature_for(pack.id)
    logits = np.atleast_2d(logits)
    if pack.task == "multi_label":
        full = logits.shape[1] == len(pack.findings)
        p = probabilities(logits, pack.task, t, exclusions=pack.exclusions if full else ())
        return p if columns is None else p[:, columns]
    bias = calibration.bias_for(pack.id, pack.finding_ids)
    if shift is not None:
        bias = bias + t * np.asarray(shift, dtype=np.float64)
    if columns is not None:
        logits = logits[:, columns]
        bias = bias[..., columns]
    return probabilities(logits, pack.task, t, bias)


@dataclass
class Scores:
    """One image's scores for every finding of a pack, in the pack's order."""

    logits: np.ndarray  # (K,) fused, uncalibrated
    probabilities: np.ndarray  # (K,) calibrated (with the context shift, if any)
    symptom_probabilities: np.ndarray | None  # (K,) text alone, softmax at T = 1
    image_probabilities: np.ndarray | None = None  # (K,) without the context shift

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
    context_shift: np.ndarray | None = None,
    view_weights: Sequence[float] | None = None,
) -> Scores:
    """Calibrated probabilities of every finding of ``pack`` for one image embedding (or
    a (V, d) stack of views of one lesion, combined by ``view_weights``, default equal)
    and, optionally, one symptom-text embedding and a clinical-context shift
    (``calibrated``); with a shift, ``image_probabilities`` keeps the differential
    without it."""
    # Several rows are views of one lesion: one differential from their weighted mean
    # logits (equivalently of calibrated logits: calibration is affine).
    z_views = finding_logits(encoder, pack, np.atleast_2d(image_emb), prompt_cache)
    w = np.full(len(z_views), 1 / len(z_views)) if view_weights is None else view_weights
    z_img = np.asarray(w, dtype=np.float64) @ z_views
    z_sym = None
    sym_p = None
    if symptom_emb is not None:
        z_sym = finding_logits(encoder, pack, symptom_emb, prompt_cache)[0]
        sym_p = zeroshot.single_label_probs(z_sym)[0]
    z = fuse(z_img, z_sym, symptom_weight)
    p = calibrated(z, pack, calibration, shift=context_shift)[0]
    p_img = None if context_shift is None else calibrated(z, pack, calibration)[0]
    if not np.isfinite(p).all() or (p_img is not None and not np.isfinite(p_img).all()):
        # corrupted weights, cache or fusion head: never a triage
        raise ModelUnavailable(
            f"the model produced non-finite scores for {pack.id} (corrupted weights, prompt "
            "cache or calibration?): no result; reinstall the model or run "
            "`medlens cache prune --all`"
        )
    return Scores(z, p, sym_p, p_img)


def with_supervised(
    pack: KnowledgePack, probabilities: dict[str, float], supervised: dict[str, float]
) -> dict[str, float]:
    """Zero-shot probabilities with the findings a supervised classifier covers replaced
    by its probabilities, then made ``consistent`` again (the no-finding cap). Only for
    multi-label domains: a classifier's independent sigmoids cannot join a differential
    whose probabilities sum to one."""
    if pack.task != "multi_label":
        raise ConfigError(
            f"a supervised classifier can only score a multi-label domain; {pack.id} is {pack.task}"
        )
    unknown = sorted(set(supervised) - set(pack.finding_ids))
    if unknown:
        raise ConfigError(f"the classifier scores findings the {pack.id} pack lacks: {unknown}")
    row = np.array(
        [[supervised.get(f, probabilities[f]) for f in pack.finding_ids]], dtype=np.float64
    )
    if not np.isfinite(row).all():
        raise ModelUnavailable("the classifier returned non-finite probabilities")
    row = consistent(row, pack.exclusions)[0]
    return {f: float(v) for f, v in zip(pack.finding_ids, row, strict=True)}
