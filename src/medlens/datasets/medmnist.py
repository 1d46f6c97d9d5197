"""MedMNIST v2 ``.npz`` datasets (DermaMNIST, PneumoniaMNIST): array-backed manifests.

MedMNIST publishes official train/val/test splits but **no patient or lesion ids**: the
splits cannot be checked for patient leakage, and Record.group stays None. (DermaMNIST
comes from HAM10000, where one lesion has up to six images; MedMNIST's split inherits
whatever grouping its authors applied.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medlens.datasets import _common as C
from medlens.datasets.manifest import Manifest, Record
from medlens.errors import DatasetError

SPLITS: tuple[str, ...] = ("train", "val", "test")


def _npz_path(name: str, root: Path, file: str | None) -> Path:
    if root.is_file():
        return root
    candidates = [file] if file else C.spec(name)["files"]
    for cand in candidates:
        if (root / cand).is_file():
            return root / cand
    raise DatasetError(f"{name}: none of {', '.join(candidates)} in {root}")


def _load_npz(name: str, root: Path | None, file: str | None) -> Manifest:
    spec = C.spec(name)
    root = C.resolve_root(name, root)
    path = _npz_path(name, root, file)
    classes: list[str] = spec["classes"]
    with np.load(path) as z:
        missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in z]
        if missing:
            raise DatasetError(f"{path.name} is not a MedMNIST file: lacks {', '.join(missing)}")
        arrays = {s: np.asarray(z[f"{s}_images"], dtype=np.uint8) for s in SPLITS}
        labels = {s: np.asarray(z[f"{s}_labels"]).reshape(-1) for s in SPLITS}
    records: list[Record] = []
    for s in SPLITS:
        if len(labels[s]) != len(arrays[s]):
            raise DatasetError(
                f"{path.name}: {s} has {len(arrays[s])} images but {len(labels[s])} labels"
            )
        bad = labels[s][(labels[s] < 0) | (labels[s] >= len(classes))]
        if bad.size:
            raise DatasetError(f"{path.name}: {s} labels outside 0..{len(classes) - 1}: {set(bad)}")
        records.extend(
            Record(id=f"{s}/{i}", labels=(classes[int(y)],), split=s, array_index=i)
            for i, y in enumerate(labels[s])
        )
    return Manifest(
        name=name,
        domain=spec["domain"],
        vocab=spec["vocab"],
        records=records,
        root=path.parent,
        arrays=arrays,
        version=C.version(name, [path], {"file": path.name}),
    )


def load_dermamnist(root: Path | None = None, *, file: str | None = None) -> Manifest:
    """DermaMNIST (HAM10000 at 28 px, or 64/128/224 with MedMNIST+ files): official
    train/val/test splits, labels 0..6 -> akiec, bcc, bkl, df, mel, nv, vasc (vocab
    ``ham10000``). Arrays (N, H, W, 3) are in ``Manifest.arrays[split]``; no patient or
    lesion ids exist in MedMNIST, so ``group`` is None."""
    return _load_npz("dermamnist", root, file)


def load_pneumoniamnist(root: Path | None = None, *, file: str | None = None) -> Manifest:
    """PneumoniaMNIST (paediatric chest X-rays, grayscale (N, H, W) arrays): official
    splits, 0 normal / 1 pneumonia (vocab ``pneumoniamnist``). The sample copy is a
    class-balanced subset (``pneumoniamnist_balanced.npz``). No patient ids: group None."""
    return _load_npz("pneumoniamnist", root, file)
