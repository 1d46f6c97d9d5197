"""Domain auto-detection (skin photo / dermoscopy vs chest X-ray).

Zero-shot against each knowledge pack's ``domain_prompts``. DICOM studies that say what
they are (modality CR/DX/XA, body part CHEST) are taken at their word.
"""

from __future__ import annotations

import numpy as np

from medlens.analysis.zeroshot import embed_prompt_sets, softmax
from medlens.io.types import StudyContext
from medlens.knowledge import DOMAINS, load_domain
from medlens.models.base import Encoder

XRAY_MODALITIES = frozenset({"CR", "DX", "RG", "DR"})
DERM_MODALITIES = frozenset({"XC", "VL", "DMS"})  # external camera, visible light, dermoscopy


def domain_embeddings(encoder: Encoder, cache_dir=None) -> np.ndarray:
    """(n_domains, dim): one prompt ensemble per domain, in ``DOMAINS`` order."""
    sets = [list(load_domain(d).domain.domain_prompts) for d in DOMAINS]
    return embed_prompt_sets(encoder, sets, cache_dir)


def domain_scores(
    image_emb: np.ndarray,
    encoder: Encoder,
    cache_dir=None,
) -> np.ndarray:
    """(N, n_domains) probabilities of each domain."""
    emb = domain_embeddings(encoder, cache_dir)
    return softmax(float(encoder.logit_scale) * (np.atleast_2d(image_emb) @ emb.T), axis=1)


def domain_from_context(context: StudyContext | None) -> str | None:
    if context is None or context.source_format != "dicom":
        return None
    if (context.modality or "").upper() in XRAY_MODALITIES and (
        context.body_part or "CHEST"
    ).upper() in {"CHEST", "THORAX", "LUNG"}:
        return "chest_xray"
    if (context.modality or "").upper() in DERM_MODALITIES:
        return "dermatology"
    return None
