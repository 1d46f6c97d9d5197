"""Similar-case library and clinical knowledge retrieval on Qdrant.

Entry points the rest of MedLens uses (see docs/retrieval.md):

- ``similar_cases(embedding, domain, encoder_fingerprint, k=5, filters=None)`` → the
  nearest cases of the default library (``[]`` when there is none).
- ``knowledge_passages(encoder, finding_ids, domain, k_per_finding=2)`` → description
  passages with finding id, section and source.
- ``build_demo_library(data_dir, encoder, limit=400)`` → a small library from the sample
  datasets when none exists.
- ``ingest`` / ``search`` / ``load_source`` / ``check_libraries`` for the CLI and scripts.

Everything heavy (qdrant, torch DataLoader) is imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medlens.retrieval.knowledge_index import knowledge_passages, search_knowledge
from medlens.retrieval.library import (
    DEFAULT_LIBRARY,
    IngestReport,
    check_libraries,
    collections_for,
    ingest,
    list_libraries,
    load_source,
    read_library,
    search,
)
from medlens.retrieval.store import Condition, open_store, parse_filter

if TYPE_CHECKING:
    from medlens.config import Settings

__all__ = [
    "DEFAULT_LIBRARY",
    "DEMO_SOURCES",
    "Condition",
    "IngestReport",
    "build_demo_library",
    "check_libraries",
    "has_library",
    "ingest",
    "knowledge_passages",
    "list_libraries",
    "load_source",
    "open_store",
    "parse_filter",
    "read_library",
    "search",
    "search_knowledge",
    "similar_cases",
]

# The demo library: share of ``limit`` per sample dataset (label-balanced subsets).
DEMO_SOURCES: dict[str, float] = {
    "isic2018": 0.4,
    "pad_ufes_20": 0.25,
    "covid_chestxray": 0.35,  # only records with clinical notes
    "cxr_samples": 1.0,  # all of its handful of files
}


def _library_name(library: str | None, settings: Settings | None = None) -> str:
    """``library`` when given, else the library of ``settings`` (of the environment when
    ``settings`` is None)."""
    if library:
        return library
    if settings is None:
        from medlens.config import get_settings

        settings = get_settings()
    return getattr(settings, "library", None) or DEFAULT_LIBRARY


def has_library(
    encoder_fingerprint: str, domain: str | None = None, library: str | None = None
) -> bool:
    """Whether the library has a collection for this model (and domain). Cheap."""
    return bool(collections_for(_library_name(library), encoder_fingerprint, domain))


def similar_cases(
    embedding: np.ndarray,
    domain: str,
    encoder_fingerprint: str,
    k: int = 5,
    filters: Sequence[Condition | str] | None = None,
    library: str | None = None,
    using: str = "image",
    settings: Settings | None = None,
) -> list[dict[str, Any]]:
    """Nearest library cases to an image embedding, ``[]`` when no library exists for
    this model and domain. ``filters``: ``Condition`` objects or strings like "age>=40".
    The library is ``library``, else ``settings.library`` (the caller's settings, e.g. the
    API's), else the environment's (MEDLENS_LIBRARY)."""
    lib = _library_name(library, settings)
    store = open_store()
    if not collections_for(lib, encoder_fingerprint, domain, store):
        return []
    conds = [parse_filter(f) if isinstance(f, str) else f for f in (filters or ())]
    return search(
        embedding,
        encoder_fingerprint,
        using=using,
        library=lib,
        domain=domain,
        k=k,
        filters=conds,
        store=store,
    )


def build_demo_library(
    data_dir: Path | str,
    encoder: Any,
    limit: int = 400,
    library: str | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[IngestReport]:
    """A small case library from the sample datasets (ISIC 2018 test, PAD-UFES-20,
    COVID-19 records with clinical notes, cxr-samples): label-balanced, deterministic,
    about ``limit`` images. Takes ~1 minute of CPU cold, seconds with a warm cache;
    datasets missing from ``data_dir`` are skipped."""
    from dataclasses import replace

    from medlens.datasets import load_dataset
    from medlens.datasets._common import spec
    from medlens.retrieval.library import subset

    data_dir = Path(data_dir).expanduser()
    lib = _library_name(library)
    reports = []
    for name, share in DEMO_SOURCES.items():
        root = data_dir / spec(name)["sample"]
        if not root.is_dir():
            continue
        m = load_dataset(name, root)
        if name == "covid_chestxray":
            m = replace(m, records=[r for r in m.records if r.text])
        n = len(m.records) if share >= 1 else max(1, int(limit * share))
        m = subset(m, n)
        source = {"dataset": name, "root": str(root), "subset": n}
        reports.append(ingest(m, encoder, lib, source=source, advance=advance))
    return reports
