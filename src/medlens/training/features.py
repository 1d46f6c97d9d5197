"""Frozen-feature cache for head-only training: one backbone pass per image, ever.

Features are stored per (dataset, dataset version, split, backbone fingerprint) under
``MEDLENS_HOME/cache/features`` as .npy written atomically, so re-running training with
the same data and backbone costs no forward passes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medlens.datasets.manifest import Manifest, Record


def feature_key(manifest: Manifest, records: Sequence[Record], backbone: str) -> str:
    h = hashlib.sha256(f"{manifest.name}|{manifest.version}|{backbone}".encode())
    for r in records:
        h.update(r.id.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def cached_features(
    manifest: Manifest,
    records: Sequence[Record],
    extract: Callable[[list[np.ndarray]], np.ndarray],
    backbone: str,
    cache_dir: Path,
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
    dtype: type = np.float32,
) -> np.ndarray:
    """Backbone features (or any per-image array: ``dtype``) for ``records``, in order,
    computed once and cached on disk."""
    path = cache_dir / f"{manifest.name}_{feature_key(manifest, records, backbone)}.npy"
    if path.is_file():
        if on_batch:
            on_batch(len(records))
        return np.load(path)
    out = []
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        out.append(np.asarray(extract([manifest.image(r) for r in batch]), dtype=dtype))
        if on_batch:
            on_batch(len(batch))
    feats = np.concatenate(out) if out else np.zeros((0, 0), dtype)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, feats)
    tmp.replace(path)
    return feats
