"""The report downloads panel of the UI: Markdown, PDF and FHIR R4B from ``POST /v1/report``.

Registered in ``ui/app.py`` under the ``report`` capability of ``/v1/info``. One click
asks the API for the three reports of the image on screen (same domain, number of
findings and symptom text as the analysis shown; each request is audited by the API with
the SHA-256 of the bytes it sent) and offers them as downloads; they are kept in the
session per image, so a rerun of the page does not ask again.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePath
from typing import Any

import streamlit as st

from medlens.ui.client import ApiClient, ApiError

__all__ = ["FORMATS", "downloads_panel", "fetch_report", "fetch_reports"]

# (label, media type asked for in Accept, file suffix)
FORMATS = (
    ("Markdown", "text/markdown", ".md"),
    ("PDF", "application/pdf", ".pdf"),
    ("FHIR R4B Bundle", "application/fhir+json", ".fhir.json"),
)
STATE_KEY = "report_downloads"


def fetch_report(
    client: ApiClient,
    image: bytes,
    filename: str,
    media: str,
    *,
    domain: str = "auto",
    top_k: int = 5,
    symptoms: str | None = None,
) -> bytes:
    """The report of ``image`` in ``media`` (an Accept value) from ``POST /v1/report``;
    ApiError (the problem JSON's title and detail) when the API refuses."""
    data: dict[str, Any] = {"domain": domain, "top_k": str(top_k)}
    if symptoms and symptoms.strip():
        data["symptoms"] = symptoms
    return client.report(image, filename, media, **data)


def fetch_reports(
    client: ApiClient, image: bytes, filename: str, result: dict[str, Any], symptoms: str | None
) -> dict[str, bytes]:
    """All of ``FORMATS`` for the analysis ``result`` shown: media type → bytes."""
    top_k = max(1, len(result.get("findings") or [])) if result.get("findings") else 5
    return {
        media: fetch_report(
            client,
            image,
            filename,
            media,
            domain=str(result.get("domain") or "auto"),
            top_k=top_k,
            symptoms=symptoms,
        )
        for _, media, _ in FORMATS
    }


def downloads_panel(client: ApiClient, result: dict[str, Any], image: bytes, filename: str) -> None:
    """Streamlit panel: a button that makes the three reports, then three downloads."""
    st.subheader("Report")
    # The symptom text (never in the analysis JSON, only its hash) comes from the input box.
    symptoms = st.session_state.get("symptoms") if result.get("symptoms") else None
    if result.get("symptoms") and not (symptoms or "").strip():
        st.info("The symptom text of this analysis is no longer in the form: analyze again.")
        return
    key = hashlib.sha256(
        image + repr((result.get("domain"), len(result.get("findings") or []), symptoms)).encode()
    ).hexdigest()
    ready = st.session_state.get(STATE_KEY)
    if not ready or ready[0] != key:
        st.caption("Markdown and PDF for people, a FHIR R4B Bundle for the record system.")
        if not st.button("Make report", key="ml-make-report", icon=":material/description:"):
            return
        with st.spinner("Writing the report…"):
            try:
                files = fetch_reports(client, image, filename, result, symptoms)
            except ApiError as exc:
                st.error(f"{exc.title}: {exc.detail}")
                return
        ready = (key, files)
        st.session_state[STATE_KEY] = ready
    stem = PurePath(filename).stem or "image"
    cols = st.columns(len(FORMATS))
    for col, (label, media, suffix) in zip(cols, FORMATS, strict=True):
        col.download_button(
            label,
            data=ready[1][media],
            file_name=f"{stem}-medlens-report{suffix}",
            mime=media,
            key=f"ml-download-{suffix.strip('.')}",
            on_click="ignore",
            icon=":material/download:",
        )
    st.caption("Decision support only — every report carries the disclaimer.")
