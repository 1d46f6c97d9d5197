"""The seam between the API and the similar-case library (``medlens.retrieval``).

The API needs only this small interface; whoever builds the case library implements
it and returns it from ``load_case_search``. Until then ``/v1/search`` and
``/v1/cases/{id}`` answer 503 "no case library built yet".

Embeddings are computed by the API with the service's one shared encoder, so a case
library can only answer for the encoder it was built with: ``fingerprint`` must equal
the encoder's fingerprint (the API refuses with 503 and says so otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from medlens.config import Settings


@runtime_checkable
class CaseSearch(Protocol):
    """What ``/v1/search`` and ``/v1/cases/{id}`` call.

    Case mappings carry at least ``id`` (str) and may carry ``domain``, ``label``
    (finding id), ``label_name``, ``text`` (report or caption), ``dataset``,
    ``split`` and ``metadata`` (a flat dict without identifiers). Search hits add
    ``score`` (cosine similarity).
    """

    fingerprint: str  # encoder fingerprint the library's vectors were made with
    version: str  # library/dataset version, recorded in the audit trail

    def search(
        self, embedding: np.ndarray, *, k: int = 8, domain: str | None = None
    ) -> Sequence[Mapping[str, Any]]:
        """Nearest cases to one L2-normalised query vector (image or text), best first."""
        ...

    def get_case(self, case_id: str) -> Mapping[str, Any] | None:
        """One case by id, or None."""
        ...

    def thumbnail(self, case_id: str) -> tuple[bytes, str] | None:
        """A small preview image: (bytes, media type such as "image/png"), or None."""
        ...


def load_case_search(settings: Settings, fingerprint: str) -> CaseSearch | None:
    """Return the site's case library for the
    encoder with ``fingerprint``, or None when none is built. The API calls this once
    at start-up (after the model has loaded)."""
    from medlens.retrieval import has_library
    from medlens.retrieval.service import LibraryCaseSearch

    if not has_library(fingerprint, library=settings.library):
        return None
    return LibraryCaseSearch(fingerprint, settings.library)


def build_demo_case_library(settings: Settings) -> None:
    """For ``medlens demo``: build a small case library from MEDLENS_DATA when
    that is set and no library exists yet. The retrieval engineer provides the builder;
    until then the demo runs without similar cases."""
    from medlens.models import load_encoder
    from medlens.retrieval import build_demo_library, has_library
    from medlens.retrieval.store import open_store

    encoder = load_encoder(settings.model, device=settings.device)
    if has_library(encoder.fingerprint, library=settings.library) or settings.data is None:
        return None
    build_demo_library(settings.data, encoder, limit=300, library=settings.library)
    store = open_store()
    if hasattr(store, "close"):
        store.close()  # the API process opens the embedded store next
    return None
