"""Concept scores: the pack's visual concepts (``concepts:`` in the knowledge YAML),
scored zero-shot like findings and labelled uncalibrated.

A concept's logit is the scoring rule's (``analysis.scoring.logits_from``) against a
reference: the pack's "normal study" prompts for multi-label packs (as findings are
scored), the pack's ``domain_prompts`` otherwise, i.e. "more like this concept than like
any image of this domain". Its score is ``sigmoid(logit)``: no temperature or threshold
has been fitted for concepts (Derm7pt criterion labels could fit them; issue 14).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medlens.analysis import scoring, zeroshot
from medlens.knowledge import KnowledgePack

CALIBRATION_NOTE = "uncalibrated zero-shot score: sigmoid of the scaled similarity difference"


def concept_embeddings(
    encoder: Any, pack: KnowledgePack, cache_dir: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """((n_concepts, dim) prompt ensembles, (dim,) reference) for ``pack``."""
    concepts = pack.domain.concepts
    ref_prompts = (
        pack.domain.reference_prompts if pack.task == "multi_label" else pack.domain.domain_prompts
    )
    sets = [list(c.prompts) for c in concepts] + [list(ref_prompts)]
    emb = zeroshot.embed_prompt_sets(encoder, sets, cache_dir)
    return emb[:-1], emb[-1]


def concept_scores(
    encoder: Any, pack: KnowledgePack, image_emb: np.ndarray, cache_dir: Path | None = None
) -> list[dict[str, Any]]:
    """One row per concept of ``pack`` for one image embedding, highest score first."""
    if not pack.domain.concepts:
        return []
    cls, ref = concept_embeddings(encoder, pack, cache_dir)
    z = scoring.logits_from(image_emb, cls, float(encoder.logit_scale), ref)[0]
    p = zeroshot.sigmoid(z)
    rows = [
        {
            "id": c.id,
            "name": c.name,
            "logit": round(float(zi), 4),
            "score": round(float(pi), 4),
            "calibrated": False,
        }
        for c, zi, pi in zip(pack.domain.concepts, z, p, strict=True)
    ]
    return sorted(rows, key=lambda r: -r["score"])
