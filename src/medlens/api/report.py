"""``POST /v1/report``: a structured report of one image, negotiated by ``Accept``.

=======================  ==========================================================
Accept                   answer
=======================  ==========================================================
application/fhir+json    FHIR R4B Bundle (DiagnosticReport, Observations, Device,
                         Provenance), checked by ``medlens.report.fhir.check_bundle``
application/pdf          one-page PDF: the image, the differential, the disclaimer
text/markdown            Markdown (also the answer to ``*/*`` or no Accept header)
application/json         the structured report itself (``medlens.report.Report``)
anything else            406 problem JSON naming the supported types
=======================  ==========================================================

Like ``/v1/analyze`` it takes the key, runs in the worker pool and writes the analysis
to the audit trail before answering; the audit record's output adds a ``report``
object (format, media type, SHA-256 of the bytes sent, whether the narrative is the
template or a checked language-model rewrite and why a rewrite was refused, the ids of the
similar past reports shown), so the trail says which report was produced from which
analysis. The record id is in ``X-Audit-ID``.

The report is made by ``medlens.report.compose.compose_report`` (similar past reports
for chest X-rays; the narrative rewrite when MEDLENS_LLM_URL is set).
"""

# No ``from __future__ import annotations``: the form's domain type is built per app.

import hashlib
import json
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from medlens.api.app import (
    _ERRORS,
    AnalysisForm,
    KeyId,
    Service,
    _run,
    analysis_form,
    audit,
    negotiate_media,
    read_upload,
    require_multipart,
)
from medlens.api.problems import Problem
from medlens.knowledge import domains

__all__ = ["ACCEPTED", "build_report_router", "negotiate"]

# media type -> report format
ACCEPTED = {
    "application/fhir+json": "fhir",
    "application/pdf": "pdf",
    "text/markdown": "md",
    "application/json": "json",
}
DEFAULT = "text/markdown"


def negotiate(accept: str | None) -> str | None:
    """The media type to answer with for an ``Accept`` header, or None (→ 406)."""
    ranges = {"*/*": DEFAULT, "text/*": DEFAULT, "application/*": "application/fhir+json"}
    return negotiate_media(accept, tuple(ACCEPTED), DEFAULT, ranges)


def _report_job(
    svc: Service, raw: bytes, form: AnalysisForm, media: str, key_id: str, request_id: str
) -> bytes:
    """Runs in a pool thread: decode → analyze → report → render → audit."""
    from medlens.report import render
    from medlens.report.compose import compose_report

    lens = svc.lens
    decoded = lens.decode(raw, form.image.filename)
    analysis = lens.analyze(decoded, symptoms=form.symptoms, domain=form.domain, top_k=form.top_k)
    # A first build of the similar-report index runs in the background, not in the request.
    report = compose_report(analysis, settings=svc.settings, wait_for_index=False)
    fmt = ACCEPTED[media]
    if fmt == "json":
        body = json.dumps(report.to_dict(), ensure_ascii=False).encode()
    else:
        body = render(report, fmt, decoded)
    if fmt == "fhir":
        from fhir.resources.R4B.bundle import Bundle

        from medlens.report.fhir import check_bundle

        problems = check_bundle(Bundle.model_validate_json(body))
        if problems:  # a bug, never the caller's fault: do not send a broken Bundle
            raise RuntimeError("FHIR bundle failed its check: " + "; ".join(problems[:3]))
    sent = {
        "format": fmt,
        "media_type": media,
        "sha256": hashlib.sha256(body).hexdigest(),
        "report_version": report.report_version,
        "narrative": "rewrite"
        if report.rewrite is not None and report.rewrite.accepted
        else "template",
        "similar_reports": [r.source_id for r in report.evidence.similar_reports],
    }
    if report.rewrite is not None and not report.rewrite.accepted:
        sent["narrative_rejected_because"] = list(report.rewrite.reasons)
    audit(
        svc,
        {**analysis.to_dict(), "report": sent},
        decoded,
        raw,
        key_id=key_id,
        request_id=request_id,
    )
    return body


def build_report_router(domain_ids: Sequence[str] | None = None) -> APIRouter:
    ids = tuple(domain_ids or domains())
    form_of = analysis_form(ids)
    r = APIRouter()

    @r.post(
        "/v1/report",
        tags=["analysis"],
        summary="A structured report of one image: FHIR R4B, PDF or Markdown (by Accept)",
        description="Analyzes the image like `/v1/analyze` and answers with a report in "
        "the media type the Accept header asks for: `application/fhir+json` (a FHIR R4B "
        "Bundle), `application/pdf`, `text/markdown` (default) or `application/json` "
        "(the structured report). Other types: 406. See docs/reports.md.",
        response_class=Response,
        dependencies=[Depends(require_multipart)],
        responses={
            200: {"content": {m: {} for m in ACCEPTED}},
            406: _ERRORS[415] | {"description": "No supported media type in Accept"},
        }
        | {k: v for k, v in _ERRORS.items() if k != 404},
    )
    async def report(
        request: Request, key_id: KeyId, form: Annotated[AnalysisForm, Depends(form_of)]
    ) -> Response:
        media = negotiate(request.headers.get("accept"))
        if media is None:
            raise Problem(
                406,
                "Not acceptable",
                f"no report in {request.headers.get('accept')!r}; ask for one of "
                f"{', '.join(ACCEPTED)} in the Accept header",
            )
        svc, raw = await read_upload(request, form)
        rid = request.state.request_id
        body = await _run(svc, _report_job, svc, raw, form, media, key_id, rid)
        headers = {"X-Audit-ID": rid}
        if media == "application/pdf":
            headers["Content-Disposition"] = f'inline; filename="medlens-report-{rid[:12]}.pdf"'
        return Response(body, media_type=media, headers=headers)

    return r
