"""Run a named evaluation protocol (``protocols.yaml``) for one encoder."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import yaml

from medlens.analysis import domain as domain_mod
from medlens.analysis import zeroshot
from medlens.config import get_settings
from medlens.datasets import load_dataset
from medlens.datasets.manifest import Manifest, Record
from medlens.errors import ConfigError
from medlens.evaluation import metrics as M
from medlens.knowledge import DOMAINS, load_domain
from medlens.training.features import cached_features


@lru_cache(maxsize=1)
def protocols() -> dict[str, dict[str, Any]]:
    text = resources.files("medlens.evaluation").joinpath("protocols.yaml").read_text("utf-8")
    return yaml.safe_load(text)


def embed_records(
    encoder: Any,
    manifest: Manifest,
    records: list[Record],
    advance: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Image embeddings through the encoder's own pipeline, cached per fingerprint."""
    return cached_features(
        manifest,
        records,
        lambda ims: encoder.embed_images(ims, batch_size=32),
        f"emb-{encoder.fingerprint}",
        get_settings().cache_dir / "embeddings",
        batch_size=64,
        on_batch=advance,
    )


def _records(manifest: Manifest, split: str | None, limit: int | None) -> list[Record]:
    recs = [
        r
        for r in manifest.records
        if (split is None or r.split == split) and (r.path is not None or r.array_index is not None)
    ]
    return recs[:limit] if limit else recs


def run_protocol(
    name: str,
    encoder: Any,
    limit: int | None = None,
    advance_factory: Callable[[str, int], Callable[[int], None]] | None = None,
) -> dict[str, Any]:
    spec = protocols().get(name)
    if spec is None:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {', '.join(protocols())}")
    started = time.time()
    if spec["kind"] == "domain":
        out = _domain_protocol(spec, encoder, limit, advance_factory)
    else:
        manifest = load_dataset(spec["dataset"])
        recs = _records(manifest, spec.get("split"), limit)
        adv = advance_factory(name, len(recs)) if advance_factory else None
        emb = embed_records(encoder, manifest, recs, adv)
        fn = _single_label if spec["kind"] == "single_label" else _binary
        out = fn(spec, encoder, manifest, recs, emb)
        out["dataset"] = {
            "name": manifest.name,
            "version": manifest.version,
            "split": spec.get("split"),
            "n": len(recs),
        }
    out.update(
        protocol=name,
        model={"name": getattr(encoder, "name", "?"), "fingerprint": encoder.fingerprint},
        seconds=round(time.time() - started, 1),
        limit=limit,
        anchors=spec.get("anchors"),
        caveat=spec.get("caveat"),
    )
    return out


def _ci(fn: Callable[..., float], *arrays: np.ndarray) -> list[float]:
    return [round(v, 4) for v in M.bootstrap_ci(fn, *arrays, n=500)]


def _single_label(
    spec: dict, encoder: Any, manifest: Manifest, recs: list[Record], emb: np.ndarray
) -> dict:
    pack = load_domain(manifest.domain)
    fids = [pack.map_label(manifest.vocab, r.labels[0]) for r in recs]
    candidates = sorted(
        {f for f in (pack.map_label(manifest.vocab, lab) for lab in manifest.label_set()) if f}
    )
    order = [pack.finding_ids.index(c) for c in candidates]
    cls = zeroshot.finding_embeddings(encoder, pack)[order]
    probs = zeroshot.single_label_probs(zeroshot.similarity_logits(emb, cls, encoder.logit_scale))
    y = np.array([candidates.index(f) for f in fids])
    pred = probs.argmax(1)
    res: dict[str, Any] = {
        "classes": candidates,
        "accuracy": round(M.accuracy(y, pred), 4),
        "accuracy_ci": _ci(M.accuracy, y, pred),
        "balanced_accuracy": round(M.balanced_accuracy(y, pred), 4),
        "balanced_accuracy_ci": _ci(M.balanced_accuracy, y, pred),
        "macro_auroc": round(M.macro_auroc(y, probs), 4),
        "macro_auroc_ci": _ci(M.macro_auroc, y, probs),
        "per_class": {
            candidates[k]: v
            for k, v in M.per_class_sens_spec(y, pred, np.arange(len(candidates))).items()
        },
        "calibration": {
            "ece": round(M.ece(probs, y), 4),
            "brier": round(M.brier(probs, y), 4),
            "nll": round(M.nll(probs, y), 4),
        },
    }
    if (urgent := spec.get("urgent")) in candidates:
        k = candidates.index(urgent)
        res[f"{urgent}_auroc"] = round(M.binary_auroc(y == k, probs[:, k]), 4)
    return res


def _binary(
    spec: dict, encoder: Any, manifest: Manifest, recs: list[Record], emb: np.ndarray
) -> dict:
    pack = load_domain(manifest.domain)
    pos = spec["positive"]
    k = pack.finding_ids.index(pack.map_label(manifest.vocab, pos))
    cls = zeroshot.finding_embeddings(encoder, pack)
    ref = zeroshot.reference_embedding(encoder, pack)
    scale = float(encoder.logit_scale)
    z = scale * (emb @ cls[k] - emb @ ref)
    p = zeroshot.sigmoid(z)
    y = np.array([pos in r.labels for r in recs], dtype=int)
    pred = (p >= 0.5).astype(int)
    return {
        "positive": pos,
        "auroc": round(M.binary_auroc(y, p), 4),
        "auroc_ci": _ci(M.binary_auroc, y, p),
        "accuracy": round(M.accuracy(y, pred), 4),
        "accuracy_ci": _ci(M.accuracy, y, pred),
    }


def _domain_protocol(spec: dict, encoder: Any, limit: int | None, advance_factory: Any) -> dict:
    per: dict[str, Any] = {}
    ys, preds = [], []
    for name in spec["datasets"]:
        manifest = load_dataset(name)
        split = spec["split"] if manifest.arrays is not None else None
        recs = _records(manifest, split, limit)
        adv = advance_factory(f"domain/{name}", len(recs)) if advance_factory else None
        emb = embed_records(encoder, manifest, recs, adv)
        pred = domain_mod.domain_scores(emb, encoder).argmax(1)
        truth = DOMAINS.index(manifest.domain)
        per[name] = {"n": len(recs), "accuracy": round(float(np.mean(pred == truth)), 4)}
        ys.append(np.full(len(recs), truth))
        preds.append(pred)
    y, p = np.concatenate(ys), np.concatenate(preds)
    return {"accuracy": round(M.accuracy(y, p), 4), "n": len(y), "per_dataset": per}
