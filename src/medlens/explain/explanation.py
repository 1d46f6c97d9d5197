"""One explanation of one analysed image, shared by ``medlens explain``,
``POST /v1/explain``, the UI and ``benchmarks/explain_latency.py``.

The image is analysed by ``MedLens.analyze`` (same gate, domain, scoring rule,
calibration and classifiers as ``analyze``), so the map explains the probability the
user sees; then one map is made for a finding (default: the top one) or a free-text
query (``saliency.explain``), plus the pack's concept scores. Maps are kept in a small
in-process cache keyed by (content hash, model fingerprint, pack version, method,
target): no file name, no identifier and no symptom text is part of a key or a result.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from medlens.errors import ConfigError
from medlens.explain import concepts, saliency
from medlens.knowledge import KnowledgePack, domains, load_domain

CACHE_SIZE = 64
METHOD_NAMES = {"text": "text saliency", "gradcam": "Grad-CAM"}


@dataclass
class Explanation:
    """An analysed image, its pack and one map (``saliency``), with the JSON view."""

    analysis: Any  # medlens.analysis.result.Analysis
    pack: KnowledgePack
    saliency: saliency.Saliency
    pixels: np.ndarray
    finding_probability: float | None
    concepts: list[dict[str, Any]]

    @property
    def title(self) -> str:
        s = self.saliency
        what = f'query "{s.label}"' if s.target == "query" else s.label
        title = f"{what} — {METHOD_NAMES.get(s.method, s.method)}"
        if self.finding_probability is not None:
            title += f" (p = {self.finding_probability:.1%})"
        return title

    def to_dict(self) -> dict[str, Any]:
        a = self.analysis
        return {
            "domain": self.pack.id,
            "model": {"name": a.model["name"], "fingerprint": a.model["fingerprint"]},
            "input": {
                "content_hash": a.input["content_hash"],
                "shape": list(self.saliency.map.shape),
            },
            "finding_probability": (
                None if self.finding_probability is None else round(self.finding_probability, 4)
            ),
            "top_findings": [
                {"id": f.id, "name": f.name, "probability": round(float(f.probability), 4)}
                for f in a.findings[:3]
            ],
            "explanation": self.saliency.summary(),
            "concepts": self.concepts,
            "concepts_note": concepts.CALIBRATION_NOTE,
        }

    def overlay_png(self, alpha: float = 0.45) -> bytes:
        return overlay_png(self.pixels, self.saliency.map, self.title, alpha)


def pack_holding(finding: str) -> str:
    """The id of the first pack with ``finding``, or a ConfigError naming the way out."""
    for d in domains():
        if finding in load_domain(d).finding_ids:
            return d
    raise ConfigError(
        f"unknown finding {finding[:60]!r}: no knowledge pack has it "
        "(GET /v1/findings or `medlens analyze --json` list the finding ids)"
    )


def check_request(
    finding: str | None, query: str | None, method: str, domain: str = "auto"
) -> str | None:
    """Validate the target before any model work; returns the cleaned query."""
    if method not in saliency.METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(saliency.METHODS)}")
    if finding is not None and query is not None:
        raise ConfigError("explain one target: a finding id or a query, not both")
    if query is not None:
        query = saliency.clean_query(query)
        if method != "text":
            raise ConfigError("a free-text query is explained by text saliency (method text)")
    if finding is not None:
        if not finding.strip():
            raise ConfigError("the finding id is empty; omit it to explain the top finding")
        pack_holding(finding)
        if domain in domains():
            load_domain(domain).finding(finding)  # ConfigError: not in the given pack
    return query


def explain_image(
    lens: Any,
    image: Any,
    *,
    finding: str | None = None,
    query: str | None = None,
    method: str = "text",
    domain: str = "auto",
    symptoms: str | None = None,
    with_concepts: bool = True,
    analysis: Any = None,
) -> Explanation:
    """Analyse ``image`` (a path, bytes or a DecodedImage) and explain one target in it.

    ``domain="auto"`` with a ``finding`` explains in the pack holding that finding.
    Pass ``analysis`` (of the same decoded image) to reuse an analysis already made.
    """
    query = check_request(finding, query, method, domain)
    if finding is not None and domain == "auto":
        domain = pack_holding(finding)
    decoded = lens.decode(image)
    if analysis is None:
        analysis = lens.analyze(decoded, symptoms=symptoms, domain=domain)
    pack = load_domain(analysis.domain)
    probs = {f.id: float(f.probability) for f in analysis.findings}
    if finding is not None:
        pack.finding(finding)  # ConfigError for an id this pack does not have
    elif query is None:
        finding = max(probs, key=probs.get)
    sal = cached_saliency(lens, decoded, pack, finding=finding, query=query, method=method)
    rows = (
        concepts.concept_scores(lens.encoder, pack, analysis.embedding, lens.cache_dir)
        if with_concepts and analysis.embedding is not None
        else []
    )
    return Explanation(
        analysis=analysis,
        pack=pack,
        saliency=sal,
        pixels=decoded.pixels,
        finding_probability=None if finding is None else probs[finding],
        concepts=rows,
    )


def attach_maps(lens: Any, analysis: Any, image: Any, top: int = 3) -> list[dict[str, Any]]:
    """Text-saliency maps (JSON summaries) for an analysis's ``top`` findings, made from
    one forward pass: what ``analyze --explain`` attaches."""
    from medlens.analysis import zeroshot

    enc, cache = lens.encoder, lens.cache_dir
    decoded = lens.decode(image)
    pack = load_domain(analysis.domain)
    cls, ref = zeroshot.scoring_embeddings(enc, pack, cache)  # once, not per finding
    targets = [
        saliency.Target(f.id, f.name, cls[pack.finding_ids.index(f.id)], ref)
        for f in analysis.findings[:top]
    ]
    maps = saliency.text_saliencies(lens.torch_encoder, decoded.pixels, targets)
    return [m.summary() for m in maps]


# -- the cache ----------------------------------------------------------------------------
_CACHE: OrderedDict[tuple[str, ...], saliency.Saliency] = OrderedDict()
_LOCK = threading.Lock()


def cache_key(
    content_hash: str,
    fingerprint: str,
    pack: KnowledgePack,
    method: str,
    finding: str | None,
    query: str | None,
) -> tuple[str, ...]:
    """(content hash, model fingerprint, pack version, method, target); a query enters
    as its SHA-256, so the key never holds free text."""
    target = (
        f"finding:{finding}"
        if query is None
        else "query:" + hashlib.sha256(query.encode()).hexdigest()
    )
    return (content_hash, fingerprint, pack.id, pack.source_hash, method, target)


def cached_saliency(
    lens: Any,
    decoded: Any,
    pack: KnowledgePack,
    *,
    finding: str | None,
    query: str | None,
    method: str,
) -> saliency.Saliency:
    enc = lens.encoder
    clf = lens.classifiers.get(pack.id) if method == "gradcam" else None
    models = enc.fingerprint if clf is None else f"{enc.fingerprint}+{clf.fingerprint}"
    key = cache_key(decoded.content_hash, models, pack, method, finding, query)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    sal = saliency.explain(
        lens.torch_encoder,
        decoded.pixels,
        pack,
        finding=finding,
        query=query,
        method=method,
        cache_dir=lens.cache_dir,
        calibration=lens.card.calibration,
        classifier=clf,
    )
    with _LOCK:
        _CACHE[key] = sal
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return sal


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


# -- the overlay --------------------------------------------------------------------------
def overlay_png(pixels: np.ndarray, heat: np.ndarray, title: str, alpha: float = 0.45) -> bytes:
    """The image with the map over it (jet, ``alpha``), a colour bar and ``title``, as
    PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be between 0 and 1 (got {alpha})")
    h, w = heat.shape
    fig, ax = plt.subplots(figsize=(6, 6 * h / w + 0.6), dpi=100)
    try:
        ax.imshow(pixels)
        im = ax.imshow(heat, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=10, parse_math=False)  # "$" in a query is text
        ax.axis("off")
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cbar.set_label("relative saliency (min-max scaled)")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()
