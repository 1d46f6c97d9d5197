"""Fit the out-of-distribution gate's reference (``medlens ood fit``).

For each domain and each of its reference datasets (the pack's ``training_datasets``,
plus ``ood_datasets``): a seeded sample of the *training* split, plus jittered copies
of some of it (flips, quarter turns, contrast stretch, gamma, brightness, saturation
and colour cast: the acquisition variation an in-domain image may show, e.g. a
contrast- and saturation-stretched copy of a dermoscopy set), gives

- a Gaussian of the joint embeddings (mean, Ledoit-Wolf precision);
- for encoders with image-tower features (lite), a bank of L2-normalised features for
  the k-nearest-neighbour distance.

Each distance's threshold is the ``acceptance`` quantile of that dataset's *validation*
images, so the gate is set to admit that share of every source, not only of the pooled
majority. Test splits are never read here: they measure the gate
(``benchmarks/ood_gate.py``, docs/ood.md).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from medlens.config import Settings, get_settings
from medlens.datasets import load_dataset
from medlens.datasets.manifest import Manifest, Record
from medlens.embeddings import (
    Space,
    embed_records,
    fill,
    is_feature_encoder,
    open_store,
    prep_version,
    record_features,
    record_key,
)
from medlens.errors import ConfigError
from medlens.knowledge import domains, load_domain
from medlens.models.base import l2_normalize
from medlens.models.card import DomainReference, OodReference, SourceReference

ACCEPTANCE = 0.99  # per validation set and distance
MAX_FIT = 800  # training images per dataset for the Gaussian (seeded sample)
MAX_VAL = 800  # validation images per dataset (seeded sample)
JITTERED = 300  # jittered training images per dataset
BANK = 300  # feature-bank rows per dataset (200 plain + 100 jittered)
K = 3  # the k of the k-NN distance (about 1 % of the bank, as k=10 of 1,000)


def sample(records: Sequence[Record], split: str, n: int, seed: int = 0) -> list[Record]:
    """Up to ``n`` records of ``split``, a seeded shuffle of the manifest's order."""
    recs = [r for r in records if r.split == split]
    random.Random(seed).shuffle(recs)
    return recs[:n]


def reference_datasets(domain: str) -> tuple[str, ...]:
    """The datasets a domain's reference is fitted on."""
    d = load_domain(domain).domain
    return tuple(dict.fromkeys((*d.training_datasets, *d.ood_datasets)))


def jitter(pixels: np.ndarray, seed: int) -> np.ndarray:
    """One deterministic acquisition-like variation of an image (per ``seed``)."""
    rng = np.random.default_rng(seed)
    x = pixels.astype(np.float32)
    if rng.random() < 0.5:
        x = x[:, ::-1]
    x = np.rot90(x, int(rng.integers(0, 4)))
    if rng.random() < 0.6:  # contrast stretch between low and high percentiles
        lo, hi = np.percentile(x, (rng.uniform(0, 3), rng.uniform(97, 100)))
        x = (x - lo) / max(float(hi - lo), 1.0) * 255
    x = 255 * (np.clip(x, 0, 255) / 255) ** rng.uniform(0.7, 1.4)
    x = x * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20)
    if x.ndim == 3 and rng.random() < 0.7:  # colour: saturation and a per-channel cast
        grey = x.mean(axis=-1, keepdims=True)
        x = grey + (x - grey) * rng.uniform(0.6, 1.8)
        x = x * rng.uniform(0.85, 1.15, size=3)
    return np.ascontiguousarray(np.clip(x, 0, 255).astype(np.uint8))


def _vectors(
    encoder: Any, m: Manifest, recs: list[Record], store: Any, jittered: bool, tick: Any
) -> tuple[np.ndarray, np.ndarray | None]:
    """(embeddings, features or None) of ``recs``, through the cache; jittered views are
    cached under their own view name (the jitter is deterministic per record)."""
    feature_encoder = is_feature_encoder(encoder)
    if not jittered:
        emb = embed_records(encoder, m, recs, store=store, progress=tick)
        feats = record_features(encoder, m, recs, store=store) if feature_encoder else None
        return emb, feats
    keys = [record_key(m, r) for r in recs]
    seeds = [int(k[:8], 16) for k in keys]
    if feature_encoder:
        import torch

        space = Space(str(encoder.features_key), "features", "ood-jitter2", prep_version(encoder))
        feats = fill(
            list(zip(recs, seeds, strict=True)),
            keys,
            space,
            lambda b: encoder.image_features([jitter(m.image(r), s) for r, s in b]).numpy(),
            store=store,
            progress=tick,
        )
        with torch.inference_mode():
            emb, _ = encoder.embed_from_features(img_feats=torch.from_numpy(feats))
        return emb.float().cpu().numpy(), feats
    space = Space(encoder.fingerprint, "image", "ood-jitter2", prep_version(encoder))
    emb = fill(
        list(zip(recs, seeds, strict=True)),
        keys,
        space,
        lambda b: encoder.embed_images([jitter(m.image(r), s) for r, s in b]),
        store=store,
        progress=tick,
    )
    return emb, None


def fit_source(
    name: str,
    train_emb: np.ndarray,
    val_emb: np.ndarray,
    train_feats: np.ndarray | None = None,
    val_feats: np.ndarray | None = None,
    *,
    acceptance: float = ACCEPTANCE,
    bank_size: int = BANK,
    k: int = K,
    seed: int = 0,
) -> SourceReference:
    """One source's Gaussian (and feature bank), thresholds from its validation images."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(train_emb, np.float64)
    lw = LedoitWolf().fit(x)
    src = SourceReference(name, lw.location_, lw.precision_, 1.0)
    emb_thr = float(np.quantile(src.emb_distance(val_emb), acceptance))
    bank = feat_thr = None
    if train_feats is not None and val_feats is not None:
        rng = np.random.default_rng(seed)
        rows = rng.choice(len(train_feats), size=min(bank_size, len(train_feats)), replace=False)
        # Rounded through float16 as it is stored, so thresholds match what is shipped.
        bank = l2_normalize(np.asarray(train_feats, np.float32)[np.sort(rows)])
        bank = bank.astype(np.float16).astype(np.float32)
        probe = SourceReference(name, src.mean, src.precision, 1.0, bank, 1.0)
        feat_thr = float(np.quantile(probe.feat_distance(val_feats, k), acceptance))
    return SourceReference(name, src.mean, src.precision, emb_thr, bank, feat_thr)


def fit_reference(
    encoder: Any,
    *,
    settings: Settings | None = None,
    acceptance: float = ACCEPTANCE,
    max_fit: int = MAX_FIT,
    max_val: int = MAX_VAL,
    jittered: int = JITTERED,
    seed: int = 0,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
) -> tuple[OodReference, dict[str, Any]]:
    """Fit every domain's reference for ``encoder``; returns it and a report (per domain
    and dataset: images used, validation acceptance at the thresholds)."""
    settings = settings or get_settings()
    root = settings.require_data()
    store = open_store(settings.cache_dir)
    refs: dict[str, DomainReference] = {}
    report: dict[str, Any] = {}
    t0 = time.perf_counter()
    for domain in domains():
        sources: list[SourceReference] = []
        rows: dict[str, Any] = {}
        for name in reference_datasets(domain):
            try:
                m: Manifest = load_dataset(name, None)
            except ConfigError:
                continue  # dataset not in this data root
            train = sample(m.records, "train", max_fit, seed)
            val = sample(m.records, "val", max_val, seed)
            if not train or not val:
                continue
            shaken = sample(m.records, "train", jittered, seed + 1)

            def tick(
                label: str, n: int, where: str = f"{domain}/{name}"
            ) -> Callable[[int], None] | None:
                return progress(f"{where}/{label}", n) if progress else None

            te, tf = _vectors(encoder, m, train, store, False, tick("train", len(train)))
            je, jf = _vectors(encoder, m, shaken, store, True, tick("jittered", len(shaken)))
            ve, vf = _vectors(encoder, m, val, store, False, tick("val", len(val)))
            train_emb = np.vstack([te, je])
            train_feats = None
            if tf is not None and jf is not None:  # the bank: 2/3 plain, 1/3 jittered
                n_plain = min(len(tf), 2 * BANK // 3)
                train_feats = np.vstack([tf[:n_plain], jf[: BANK - n_plain]])
            src = fit_source(name, train_emb, ve, train_feats, vf, acceptance=acceptance)
            sources.append(src)
            rows[name] = {
                "fit": len(train),
                "jittered": len(shaken),
                "val": len(val),
                "emb_threshold": src.emb_threshold,
                "feat_threshold": src.feat_threshold,
            }
        if not sources:
            raise ConfigError(
                f"no training and validation images for domain {domain} under {root}: "
                f"the reference needs {', '.join(reference_datasets(domain))}"
            )
        refs[domain] = DomainReference(tuple(sources), acceptance)
        report[domain] = {"datasets": rows}
    info = {
        "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "acceptance": acceptance,
        "max_fit": max_fit,
        "max_val": max_val,
        "jittered": jittered,
        "bank": BANK,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "method": "per-source Mahalanobis (embedding) and k-NN (image features) distances",
    }
    return OodReference(encoder.fingerprint, refs, K, info), report
