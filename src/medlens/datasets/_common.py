"""Helpers every loader shares: the constants file, root resolution, CSV reading, image
lookup by name and the manifest version.

Loaders never decode images: they read index files and list folders, so building a
manifest stays fast even for the full datasets.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from medlens import _yaml
from medlens.config import get_settings
from medlens.datasets.manifest import hash_files
from medlens.errors import DatasetError

log = logging.getLogger("medlens.datasets")


@lru_cache(maxsize=1)
def constants() -> dict[str, Any]:
    """The parsed ``datasets.yaml`` (read once; it ships with the package)."""
    text = resources.files("medlens.datasets").joinpath("datasets.yaml").read_text("utf-8")
    return _yaml.safe_load(text)


def spec(name: str) -> dict[str, Any]:
    return constants()["datasets"][name]


def default_seed() -> int:
    return int(constants()["seed"])


def default_fractions() -> dict[str, float]:
    return {k: float(v) for k, v in constants()["fractions"].items()}


def image_suffixes() -> frozenset[str]:
    return frozenset(constants()["image_suffixes"])


def resolve_root(name: str, root: Path | str | None) -> Path:
    """The dataset folder: ``root`` when given, else its sample folder under MEDLENS_DATA."""
    if root is not None:
        path = Path(root).expanduser()
        if not path.exists():
            raise DatasetError(f"{name}: {path} does not exist")
        return path
    data = get_settings().require_data()
    path = data / spec(name)["sample"]
    if not path.is_dir():
        raise DatasetError(
            f"{name}: no sample copy at {path}; pass root= the folder of the downloaded dataset"
        )
    return path


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            return fh.readline()
    except (OSError, UnicodeDecodeError):
        return ""


def _delimiter(line: str) -> str:
    # HAM10000's Dataverse copy is tab-separated; every other index here uses commas.
    return "\t" if line.count("\t") > line.count(",") else ","


def read_header(path: Path) -> list[str]:
    """Column names of a CSV/TSV file (first line only; empty list if unreadable)."""
    line = _first_line(path)
    return [c.strip() for c in next(csv.reader([line], delimiter=_delimiter(line)), [])]


def read_rows(path: Path, required: Iterable[str] = ()) -> list[dict[str, str]]:
    """All rows of a CSV (or tab-separated) file as dicts; DatasetError on missing columns."""
    line = _first_line(path)
    header = [c.strip() for c in next(csv.reader([line], delimiter=_delimiter(line)), [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(f"{path.name} lacks column(s) {', '.join(missing)}; has {header}")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return [
            {k.strip(): (v or "") for k, v in row.items() if k is not None}
            for row in csv.DictReader(fh, delimiter=_delimiter(line))
        ]


def blank(value: str | None) -> str | None:
    """A CSV cell with surrounding space removed, None when empty."""
    if value is None:
        return None
    value = value.strip()
    return value or None


def index_images(dirs: Iterable[Path], recursive: bool = False) -> dict[str, Path]:
    """File name and stem -> path for every image file in ``dirs`` (first one wins).

    Listing folders once is much faster than testing each index row with ``exists()``;
    indexing stems too lets CSVs that give image ids without an extension (ISIC) resolve.
    """
    suffixes = image_suffixes()
    out: dict[str, Path] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        paths = (
            (Path(dp) / f for dp, _, fs in os.walk(d) for f in fs)
            if recursive
            else (Path(e.path) for e in os.scandir(d) if e.is_file())
        )
        for p in sorted(paths):
            if p.suffix.lower() in suffixes:
                out.setdefault(p.name, p)
                out.setdefault(p.stem, p)
    return out


def rows_with_images(
    name: str, rows: list[dict[str, str]], images: Mapping[str, Path], column: str
) -> list[dict[str, str]]:
    """The index rows whose ``column`` names an image in ``images``; rows with a blank
    value are dropped silently, rows whose file is absent with a warning."""
    named = [r for r in rows if r[column].strip()]
    kept = [r for r in named if r[column].strip() in images]
    warn_missing(name, len(named) - len(kept))
    return kept


def warn_missing(name: str, missing: int) -> None:
    """Say how many index rows were dropped because their image file is absent
    (a partial download must not pass silently)."""
    if missing:
        log.warning("%s: %d index row(s) skipped: image file not found", name, missing)


def manifest(
    name: str,
    spec: Mapping[str, Any],
    records: list[Any],
    root: Path,
    index_files: list[Path],
    options: Mapping[str, Any],
) -> Any:
    """The one way a file-backed loader builds its Manifest (domain/vocab from the spec,
    version from the index files and the resolved options)."""
    from medlens.datasets.manifest import Manifest

    return Manifest(
        name=name,
        domain=spec["domain"],
        vocab=spec["vocab"],
        records=records,
        root=root,
        version=version(name, index_files, options),
    )


def version(name: str, index_files: list[Path], options: Mapping[str, Any]) -> str:
    """Manifest version: index files' content + loader name, format and resolved options."""
    extra = {"loader": name, "format": constants()["format"], "options": dict(options)}
    return hash_files(index_files, extra)
