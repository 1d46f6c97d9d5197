"""One manifest type for every dataset: records with labels, text, group and split.

Labels stay in the dataset's own vocabulary (``Manifest.vocab``); the knowledge packs map
them to findings (``KnowledgePack.findings_for``), so a dataset loader never hard-codes
clinical knowledge.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Record:
    id: str  # unique within the manifest, stable across runs
    labels: tuple[str, ...] = ()  # raw dataset labels; () = unlabelled
    split: str | None = None  # "train" | "val" | "test" | None
    group: str | None = None  # patient / lesion id: records sharing it never cross splits
    text: str | None = None  # report, clinical notes or symptom sentence
    path: Path | None = None  # image file, or None for array-backed datasets
    array_index: int | None = None  # row in Manifest.arrays[split] for array-backed datasets
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    name: str  # dataset name, e.g. "dermamnist"
    domain: str  # knowledge domain id: "dermatology" | "chest_xray"
    vocab: str  # label vocabulary key used in the knowledge packs, e.g. "ham10000"
    records: list[Record]
    root: Path
    # Array-backed datasets (MedMNIST .npz): split -> uint8 array (N, H, W[, 3])
    arrays: dict[str, np.ndarray] | None = None
    version: str = ""  # content hash of the source files (dataset version)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def subset(self, split: str) -> Manifest:
        return replace(self, records=[r for r in self.records if r.split == split])

    def image(self, record: Record) -> np.ndarray:
        """RGB uint8 (H, W, 3) pixels of one record, decoded through ``medlens.io``."""
        if record.path is not None:
            from medlens.io import load_image

            return load_image(record.path).pixels
        if self.arrays is None or record.array_index is None or record.split is None:
            raise ValueError(f"record {record.id} has neither a path nor an array row")
        arr = self.arrays[record.split][record.array_index]
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        return np.ascontiguousarray(arr, dtype=np.uint8)

    def vocab_of(self, record: Record) -> str:
        """Label vocabulary of one record: ``meta["vocab"]`` where a manifest mixes sources
        with different vocabularies (``cxr_samples``), else the manifest's own."""
        return str(record.meta.get("vocab") or self.vocab)

    def label_set(self) -> set[str]:
        return {lab for r in self.records for lab in r.labels}


def sha256_file(path: Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_files(paths: list[Path], extra: Mapping[str, Any] | None = None) -> str:
    """Content hash of a dataset's index files (+ loader parameters) as its version.

    Hashing the index files (CSV/NPZ) rather than every image keeps this fast; image
    files are covered by their names in the index.
    """
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    if extra:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
