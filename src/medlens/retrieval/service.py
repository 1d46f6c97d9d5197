"""The case library as the API sees it (``medlens.api.cases.CaseSearch``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medlens.knowledge import domains, load_domain
from medlens.retrieval.library import (
    DEFAULT_LIBRARY,
    collections_for,
    public_thumbnail,
    read_library,
    resolve_thumbnail,
    search,
)
from medlens.retrieval.store import open_store


class LibraryCaseSearch:
    """Search one library's collections for one encoder; cases addressed by point id.

    ``get_case`` reads payloads with a one-off scroll held in memory: fine for the
    thousands of cases of a site library on one machine; a server deployment at
    millions of points would add a payload index on the point id instead.
    """

    def __init__(self, fingerprint: str, library: str = DEFAULT_LIBRARY):
        self.fingerprint = fingerprint
        self.library = library
        self._store = open_store()
        self._cases: dict[str, dict[str, Any]] | None = None
        record = read_library(library)
        self.version = hashlib.sha256(
            json.dumps(record.get("collections", {}), sort_keys=True).encode()
        ).hexdigest()[:16]

    def search(
        self, embedding: np.ndarray, *, k: int = 8, domain: str | None = None
    ) -> Sequence[Mapping[str, Any]]:
        rows = search(
            np.asarray(embedding, np.float32),
            self.fingerprint,
            library=self.library,
            domain=domain,
            k=k,
            store=self._store,
        )
        return [self._case(r) for r in rows]

    def get_case(self, case_id: str) -> Mapping[str, Any] | None:
        if self._cases is None:
            self._cases = {}
            for coll in collections_for(self.library, self.fingerprint, None, self._store):
                for p in self._store.scroll(coll):
                    self._cases[p.id] = self._case({**p.payload, "point_id": p.id})
        return self._cases.get(case_id)

    def thumbnail(self, case_id: str) -> tuple[bytes, str] | None:
        """The preview's bytes; its file is resolved here, server-side, from the case's
        relative thumbnail name (responses never carry a filesystem path)."""
        case = self.get_case(case_id)
        path = resolve_thumbnail(case.get("thumbnail") if case else None)
        if path is None or not path.is_file():
            return None
        return path.read_bytes(), "image/jpeg"

    @staticmethod
    def _case(row: Mapping[str, Any]) -> dict[str, Any]:
        findings = list(row.get("findings") or [])
        label = findings[0] if findings else None
        name = None
        if label and row.get("domain") in domains():
            name = load_domain(row["domain"]).finding(label).name
        out = {
            "id": row.get("point_id"),
            "case_id": row.get("case_id"),
            "domain": row.get("domain"),
            "label": label,
            "label_name": name,
            "labels": row.get("labels", []),
            "text": row.get("text"),
            "dataset": row.get("dataset"),
            "split": row.get("split"),
            "thumbnail": public_thumbnail(row.get("thumbnail")),
        }
        if "similarity" in row:
            out["score"] = row["similarity"]
        return out
