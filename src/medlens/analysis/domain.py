"""Domain auto-detection (skin photo / dermoscopy vs chest X-ray, and any added pack).

Zero-shot against each knowledge pack's ``domain_prompts``. DICOM studies that say what
they are (a pack's ``dicom`` rule: Modality, Body Part Examined) are taken at their word.
"""

from __future__ import annotations

import numpy as np

from medlens.analysis.zeroshot import embed_prompt_sets, softmax
from medlens.io.types import StudyContext
from medlens.knowledge import domains, load_domain
from medlens.models.base import Encoder


def domain_embeddings(encoder: Encoder, cache_dir=None) -> np.ndarray:
    """(n_domains, dim): one prompt ensemble per domain, in ``domains()`` order."""
    sets = [list(load_domain(d).domain.domain_prompts) for d in domains()]
    return embed_prompt_sets(encoder, sets, cache_dir)


def domain_scores(
    image_emb: np.ndarray,
    encoder: Encoder,
    cache_dir=None,
) -> np.ndarray:
    """(N, n_domains) probabilities of each domain."""
    emb = domain_embeddings(encoder, cache_dir)
    return softmax(float(encoder.logit_scale) * (np.atleast_2d(image_emb) @ emb.T), axis=1)


def unsupported_dicom(context: StudyContext | None) -> str | None:
    """Why a DICOM study is outside every pack (its Modality, or Body Part Examined,
    matches no pack's ``dicom`` rule), or None when it is not, or says nothing."""
    if context is None or context.source_format != "dicom" or not context.modality:
        return None
    if domain_from_context(context) is not None:
        return None
    modality = context.modality.upper()
    accepted = sorted({m for d in domains() for m in load_domain(d).domain.dicom.modalities})
    if modality not in accepted:
        return f"DICOM modality {modality} is not one MedLens analyses ({', '.join(accepted)})"
    return (
        f"a DICOM {modality} of body part {context.body_part or 'unknown'} is outside every "
        "knowledge pack (chest radiographs and skin images only)"
    )


def domain_from_context(context: StudyContext | None) -> str | None:
    """The domain whose ``dicom`` rule the study's header matches, if any."""
    if context is None or context.source_format != "dicom":
        return None
    modality = (context.modality or "").upper()
    body_part = (context.body_part or "").upper()
    for d in domains():
        rule = load_domain(d).domain.dicom
        if modality not in rule.modalities:
            continue
        if not rule.body_parts:
            return d
        if body_part in rule.body_parts or (not body_part and rule.body_part_default):
            return d
    return None


def candidates(
    scores: np.ndarray, domain: str = "auto", context: StudyContext | None = None
) -> tuple[list[str], str]:
    """The domains an image may be scored in, most likely first, and why: the one given,
    the one the DICOM header names, or every domain by zero-shot ``scores`` (the
    out-of-distribution gate then admits the first whose reference accepts the image)."""
    if domain != "auto":
        return [domain], "given"
    if (from_ctx := domain_from_context(context)) is not None:
        return [from_ctx], "dicom"
    return [domains()[i] for i in np.argsort(-np.asarray(scores))], "image"


# Mean |R−G| + |G−B| (grey levels) on a coarse grid below which an image counts as grey.
# Only decides which views the first forward pass carries (a latency choice): the
# scores are the same either way, a wrong guess costs one more, smaller forward pass.
GREY_CHANNEL_SPREAD = 2.0


def is_grey(pixels: np.ndarray) -> bool:
    """Whether an (H, W, 3) uint8 image is (near) grey, e.g. a radiograph, judged on a
    ~64 × 64 grid so it costs microseconds even at 4k."""
    step = max(1, min(pixels.shape[:2]) // 64)
    g = pixels[::step, ::step].astype(np.int16)
    spread = np.abs(g[..., 0] - g[..., 1]) + np.abs(g[..., 1] - g[..., 2])
    return float(spread.mean()) < GREY_CHANNEL_SPREAD


def likely_flips(
    pixels: np.ndarray, domain: str = "auto", context: StudyContext | None = None
) -> tuple[str, ...]:
    """The test-time flips to batch into an image's first forward pass, before its domain
    is known: the given (or DICOM-named) domain's, none for a grey image (no pack that
    scores flips takes radiographs), else those of the packs that score flips. Scoring
    uses them only if the admitted domain asks for exactly these views."""
    named = domain if domain != "auto" else domain_from_context(context)
    if named is not None:
        return tuple(load_domain(named).domain.test_time_flips)
    if is_grey(pixels):
        return ()
    flips: list[str] = []
    for d in domains():
        flips += [f for f in load_domain(d).domain.test_time_flips if f not in flips]
    return tuple(flips)
