"""The gate before any diagnosis: is this an image MedLens may score at all?

Two checks, both before a probability is shown:

1. **Quality** of the decoded pixels (``check_pixels``, limits in ``quality.yaml``): too
   small or blank images abstain; tiny, over- or under-exposed ones carry a warning
   (``low_quality``).
2. **Out of distribution** (``choose_domain``): the image's distances to each source
   dataset of the domain's reference (``models.card.SourceReference``: Mahalanobis in
   the joint embedding, k-NN in the image tower's features), each divided by its
   threshold (chosen on that source's validation images by ``medlens ood fit``); a
   score of at most 1 for some source admits the image. An image that no candidate
   domain admits abstains (``OutOfDomain``) with its score in the reason.

A model without a reference is not gated; its analyses say so in ``quality.warnings``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from medlens import _yaml
from medlens.errors import OutOfDomain
from medlens.models.card import OodReference

NO_REFERENCE = (
    "no out-of-distribution reference for this model: the image was not checked "
    "against the data the model was built on (medlens ood fit)"
)


@lru_cache(maxsize=1)
def limits() -> dict[str, Any]:
    """The quality limits (``analysis/quality.yaml``)."""
    text = resources.files("medlens.analysis").joinpath("quality.yaml").read_text("utf-8")
    return _yaml.safe_load(text)


@dataclass
class Gate:
    """What the gate found for one image (the analysis's ``quality`` object)."""

    warnings: list[str] = field(default_factory=list)
    ood: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        return "low_quality" if any(w.startswith("low quality") for w in self.warnings) else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "warnings": list(self.warnings), "ood": self.ood}


def check_pixels(pixels: np.ndarray) -> list[str]:
    """Warnings for a usable but poor image; ``OutOfDomain`` for one that shows nothing
    (smaller than ``abstain.min_side`` or uniform)."""
    lim = limits()
    h, w = pixels.shape[:2]
    if min(h, w) < lim["abstain"]["min_side"]:
        raise OutOfDomain(
            f"the image is {w}x{h} pixels, too small to show a lesion or a chest "
            f"(at least {lim['abstain']['min_side']} px a side): MedLens abstains"
        )
    step = max(1, -(-max(h, w) // 256))  # statistics on at most ~256 px a side: cheap
    px = np.asarray(pixels)[::step, ::step]
    # Channel-first float32 rows: contiguous reductions (a strided per-channel std over
    # interleaved RGB costs several times more on a busy analysis path).
    chans = np.ascontiguousarray(np.moveaxis(px.reshape(px.shape[0], px.shape[1], -1), -1, 0))
    chans = chans.reshape(chans.shape[0], -1).astype(np.float32)
    std = float(chans.std(axis=1).max())
    if std < lim["abstain"]["min_std"]:
        raise OutOfDomain(
            f"the image is blank (uniform: pixel standard deviation {std:.1f} grey "
            "levels): MedLens abstains"
        )
    warn = lim["warn"]
    out = []
    if min(h, w) < warn["min_side"]:
        out.append(
            f"low quality: the image is only {w}x{h} pixels (under {warn['min_side']} px "
            "a side); fine detail cannot be assessed"
        )
    grey = chans.mean(axis=0)
    if (bright := float((grey >= warn["bright_level"]).mean())) > warn["fraction"]:
        out.append(f"low quality: over-exposed ({bright:.0%} of pixels saturated)")
    if (top := float(np.percentile(grey, 99.9))) < warn["dark_p999"]:
        out.append(f"low quality: under-exposed (99.9 % of pixels darker than {top:.0f}/255)")
    return out


def frames_note(frames: int, source_format: str | None) -> list[str]:
    """Say which frame of a multi-frame file was analysed (io decodes one: a TIFF's
    first page, a DICOM's middle frame), so a reader knows the rest were not."""
    if frames <= 1:
        return []
    which = "the middle frame" if source_format == "dicom" else "the first page"
    return [f"the file holds {frames} frames or pages; only {which} was analysed"]


def choose_domain(
    reference: OodReference | None,
    emb: np.ndarray,
    candidates: list[str],
    gate: Gate,
    feats: np.ndarray | None = None,
    *,
    header: bool = False,
) -> str:
    """The first of ``candidates`` (most likely first) whose reference admits the image
    (its embedding ``emb`` and, for encoders with them, image-tower ``feats``);
    ``OutOfDomain`` when none does. Without a reference: the first candidate, with the
    ``NO_REFERENCE`` warning. A domain the reference does not cover (a pack added after
    it was fitted) is taken unchecked, with a warning, only as the first candidate.

    ``header``: the domain comes from a DICOM header that names it (a CR/DX chest, a
    dermoscopy object). The header is better evidence of what the image is than an
    embedding distance, so an atypical image is scored with a ``low quality`` warning
    instead of abstaining (a real radiograph with unusual exposure, or from a detector
    unlike the training sets', must not be refused for being unusual)."""
    if reference is None:
        gate.warnings.append(NO_REFERENCE)
        return candidates[0]
    closest: tuple[float, str, str] | None = None
    for i, d in enumerate(candidates):
        ref = reference.domains.get(d)
        if ref is None:
            if i > 0:  # never a fallback: only the given or most likely domain
                continue
            gate.warnings.append(
                f"the out-of-distribution reference does not cover domain {d}: the image "
                "was not checked against it (medlens ood fit)"
            )
            return d
        scores, nearest = ref.scores(emb, feats, reference.k)
        score = float(scores[0])
        if score <= 1.0:
            gate.ood = {
                "domain": d,
                "score": round(score, 3),
                "nearest_source": nearest[0],
                "reference": reference.id,
            }
            return d
        if closest is None or score < closest[0]:
            closest = (score, d, nearest[0])
    if closest is None:
        raise OutOfDomain("no domain could check this image: MedLens abstains (medlens ood fit)")
    score, d, near = closest
    if header:
        gate.ood = {
            "domain": d,
            "score": round(score, 3),
            "nearest_source": near,
            "reference": reference.id,
        }
        gate.warnings.append(
            f"low quality: the image is unlike the {d.replace('_', ' ')} images the model was "
            f"built on (out-of-distribution score {score:.2f} > 1); its DICOM header says "
            "what it is, so it is scored, but the result may not apply"
        )
        return d
    others = [x for x in candidates if x != d]
    raise OutOfDomain(
        f"the image does not resemble the {d.replace('_', ' ')} images the model was built "
        f"on (out-of-distribution score {score:.2f} > 1"
        + (f"; nor {', '.join(o.replace('_', ' ') for o in others)}" if others else "")
        + "): MedLens abstains rather than guess"
    )
