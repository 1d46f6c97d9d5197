"""Dataset loaders: every public dataset, a folder or a CSV becomes one ``Manifest``.

>>> from medlens.datasets import load_dataset
>>> m = load_dataset("isic2018")            # sample copy under MEDLENS_DATA
>>> m.vocab, len(m), m.records[0].split
('ham10000', 1512, 'test')

Loaders read index files and list folders only (no image decoding), so they are fast.
Each manifest's ``version`` hashes its index files plus the resolved loader options;
seeds, split fractions, class orders and sample folder names live in ``datasets.yaml``.
Grouped splits (PAD-UFES-20 by patient, COVID by patient, DermNet by image content,
HAM10000 by lesion, NIH by patient, Derm7pt's two views by case) never put one group in two splits.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medlens.datasets import _common as C
from medlens.datasets.chest_xray import (
    load_covid_chestxray,
    load_cxr_samples,
    load_iu_xray,
    load_nih_cxr14,
)
from medlens.datasets.derm7pt import load_derm7pt
from medlens.datasets.dermatology import (
    load_dermnet,
    load_ham10000,
    load_isic2018,
    load_pad_ufes_20,
    render_pad_symptoms,
)
from medlens.datasets.generic import load_csv_manifest, load_folder
from medlens.datasets.manifest import Manifest, Record, hash_files
from medlens.datasets.medmnist import load_dermamnist, load_pneumoniamnist
from medlens.errors import ConfigError, DatasetError

__all__ = [
    "DATASETS",
    "Manifest",
    "Record",
    "detect_dataset",
    "hash_files",
    "load_csv_manifest",
    "load_dataset",
    "load_folder",
    "load_path",
    "render_pad_symptoms",
]

Loader = Callable[..., Manifest]

DATASETS: dict[str, Loader] = {
    "dermamnist": load_dermamnist,
    "pneumoniamnist": load_pneumoniamnist,
    "isic2018": load_isic2018,
    "ham10000": load_ham10000,
    "pad_ufes_20": load_pad_ufes_20,
    "dermnet": load_dermnet,
    "derm7pt": load_derm7pt,
    "covid_chestxray": load_covid_chestxray,
    "iu_xray": load_iu_xray,
    "nih_cxr14": load_nih_cxr14,
    "cxr_samples": load_cxr_samples,
}


def load_dataset(name: str, root: Path | str | None = None, **options: Any) -> Manifest:
    """Load a named dataset from ``root`` (default: its sample folder under MEDLENS_DATA).

    ``options`` are the loader's keyword arguments (e.g. ``seed``, ``fractions``); an
    unknown option is a ConfigError rather than being silently ignored, because options
    change splits and the manifest version.
    """
    loader = DATASETS.get(name)
    if loader is None:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    accepted = [p for p in inspect.signature(loader).parameters if p != "root"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{name}: unknown option(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    return loader(Path(root) if root is not None else None, **options)


def _matches(folder: Path, rule: dict[str, Any]) -> bool:
    if "any_file" in rule:
        return any((folder / f).is_file() for f in rule["any_file"])
    hits = sorted(folder.glob(rule["glob"]))
    if not hits:
        return False
    cols = rule.get("columns")
    return not cols or any(set(cols) <= set(C.read_header(h)) for h in hits)


def detect_dataset(path: Path | str) -> str | None:
    """Name of the dataset whose layout ``path`` has (a folder, or one of its index
    files), from the ``detect`` rules in ``datasets.yaml``; None if none matches.

    Rules are file names (globs) plus, for generic names like ``labels.csv``, the columns
    the header must contain: ``dermnet/labels.csv`` with image,condition is DermNet, the
    same name with image_id,dx is ISIC 2018.
    """
    path = Path(path).expanduser()
    for name, spec in C.constants()["datasets"].items():
        for rule in spec.get("detect", ()):
            if path.is_dir():
                if _matches(path, rule):
                    return name
            elif path.is_file():
                if "any_file" in rule:
                    continue
                if fnmatch.fnmatch(path.name, Path(rule["glob"]).name) and _matches(
                    path.parent, {**rule, "glob": path.name}
                ):
                    return name
    return None


def load_path(path: Path | str, domain: str | None = None, **options: Any) -> Manifest:
    """Load whatever is at ``path``: a recognised dataset layout, else (with ``domain``)
    a plain image folder via ``load_folder``."""
    path = Path(path).expanduser()
    name = detect_dataset(path)
    if name is not None:
        root = path if path.is_dir() or path.suffix == ".npz" else path.parent
        # The GT CSV inside its zip folder (a *file* path): the dataset root is one up.
        # A dataset folder is its own root even when its name is the CSV's stem.
        if path.is_file() and root.name == path.stem and name == "isic2018":
            root = root.parent
        return load_dataset(name, root, **options)
    if domain is None:
        raise DatasetError(
            f"{path} has no known dataset layout; pass a domain to load it as an image folder"
        )
    return load_folder(path, domain, **options)
