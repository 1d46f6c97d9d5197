"""Structured reports from an ``Analysis`` (docs/reports.md).

``build_report`` makes the ``Report`` (model.py); renderers turn it into Markdown
(markdown.py), a one-page PDF (pdf.py) or a FHIR R4B Bundle with its structural check
(fhir.py). fpdf2 and fhir.resources are imported by those modules only.
``compose.compose_report`` is what the CLI and API call: the report plus similar past
reports (chest X-rays) and, with MEDLENS_LLM_URL, a grounded rewrite of the narrative.
"""

from __future__ import annotations

from typing import Any

from medlens.report.model import Report, build_report

FORMATS = ("md", "pdf", "fhir")
MEDIA_TYPES = {"md": "text/markdown", "pdf": "application/pdf", "fhir": "application/fhir+json"}

__all__ = ["FORMATS", "MEDIA_TYPES", "Report", "build_report", "render"]


def render(report: Report, fmt: str, image: Any = None) -> bytes:
    """The report in one of ``FORMATS`` as bytes; ConfigError for another format.

    ``image`` (a ``DecodedImage`` or RGB array) is drawn on the PDF page."""
    from medlens.errors import ConfigError

    if fmt == "md":
        from medlens.report.markdown import to_markdown

        return to_markdown(report).encode()
    if fmt == "pdf":
        from medlens.report.pdf import to_pdf

        return to_pdf(report, image)
    if fmt == "fhir":
        from medlens.report.fhir import to_fhir_bundle

        return to_fhir_bundle(report).model_dump_json(exclude_none=True, indent=2).encode()
    raise ConfigError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
