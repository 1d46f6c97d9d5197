"""``POST /v1/explain``: where the model looked, as a PNG overlay or JSON (by ``Accept``).

=================  ============================================================
Accept             answer
=================  ============================================================
image/png          the image with the map over it (opacity ``alpha``), a colour
                   bar and the finding or query named in the title
application/json   the explanation JSON of ``medlens explain --json`` (also the
                   answer to ``*/*`` or no Accept header)
anything else      406 problem JSON naming the supported types
=================  ============================================================

Form fields: ``image`` (required), ``finding`` (a finding id; default: the top finding),
``query`` (free text, e.g. "blue-white veil"; text saliency only), ``method``
(``text`` | ``gradcam``), ``domain``, ``alpha`` (PNG only). The image is analysed as
``/v1/analyze`` does (same key, upload checks, gate, worker pool and RFC 7807 errors)
and the analysis is written to the audit trail with an ``explanation`` object (method,
target, media type, SHA-256 of the bytes sent; a query only as its keyed hash).
"""

# No ``from __future__ import annotations``: the form's domain type is built per app.

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response

from medlens.api.app import (
    _ERRORS,
    KeyId,
    Service,
    _run,
    abstention,
    audit,
    negotiate_media,
    require_multipart,
)
from medlens.api.problems import Problem
from medlens.errors import EmptyInput, OutOfDomain
from medlens.knowledge import domains

__all__ = ["ACCEPTED", "build_explain_router", "negotiate"]

ACCEPTED = ("application/json", "image/png")
DEFAULT = "application/json"


def negotiate(accept: str | None) -> str | None:
    """The media type to answer with for an ``Accept`` header, or None (→ 406)."""
    ranges = {"*/*": DEFAULT, "application/*": DEFAULT, "image/*": "image/png"}
    return negotiate_media(accept, ACCEPTED, DEFAULT, ranges)


@dataclass
class ExplainForm:
    image: UploadFile
    finding: str | None
    query: str | None
    method: str
    domain: str
    alpha: float


def explain_form(domain_ids: Sequence[str]):
    DomainChoice = Literal[("auto", *domain_ids)]  # type: ignore[valid-type]

    def form(
        image: Annotated[UploadFile, File(description="PNG, JPEG, BMP, TIFF, WebP or DICOM")],
        finding: Annotated[
            str | None, Form(description="Finding id to explain (default: the top finding)")
        ] = None,
        query: Annotated[
            str | None,
            Form(description='Free-text query, e.g. "blue-white veil" (text saliency only)'),
        ] = None,
        method: Annotated[Literal["text", "gradcam"], Form()] = "text",
        domain: Annotated[DomainChoice, Form()] = "auto",
        alpha: Annotated[float, Form(ge=0.0, le=1.0, description="Overlay opacity (PNG)")] = 0.45,
    ) -> ExplainForm:
        return ExplainForm(image, finding, query, method, domain, alpha)

    return form


def _explain_job(
    svc: Service, raw: bytes, form: ExplainForm, media: str, key_id: str, request_id: str
) -> bytes:
    """Runs in a pool thread: decode → analyze → explain → render → audit."""
    from medlens.analysis.symptoms import text_hash
    from medlens.explain.explanation import explain_image

    lens = svc.lens
    decoded = lens.decode(raw, form.image.filename)
    try:
        ex = explain_image(
            lens,
            decoded,
            finding=form.finding,
            query=form.query,
            method=form.method,
            domain=form.domain,
        )
    except OutOfDomain as exc:  # an abstention is audited, as /v1/analyze does
        record = abstention(lens, decoded, exc)
        audit(svc, record, decoded, raw, key_id=key_id, request_id=request_id)
        raise
    if media == "image/png":
        body = ex.overlay_png(form.alpha)
    else:
        body = json.dumps(ex.to_dict(), ensure_ascii=False).encode()
    s = ex.saliency
    sent = {
        "method": s.method,
        "target": s.target,
        "query_sha256": text_hash(s.label, svc.settings) if s.target == "query" else None,
        "media_type": media,
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    out = ex.analysis.to_dict()
    audit(svc, {**out, "explanation": sent}, decoded, raw, key_id=key_id, request_id=request_id)
    return body


def build_explain_router(domain_ids: Sequence[str] | None = None) -> APIRouter:
    ids = tuple(domain_ids or domains())
    form_of = explain_form(ids)
    r = APIRouter()

    @r.post(
        "/v1/explain",
        tags=["analysis"],
        summary="Where the model looked: a saliency map for a finding or a free-text query",
        description="Analyzes the image like `/v1/analyze`, then maps one target: `finding` "
        "(default: the top finding; text saliency or Grad-CAM) or `query` (free text, text "
        "saliency). `Accept: image/png` answers with an overlay (opacity `alpha`); "
        "`application/json` (default) with the low-resolution map, its peak, the share of "
        "the map in its top 10 % of pixels and the pack's concept scores (uncalibrated).",
        response_class=Response,
        dependencies=[Depends(require_multipart)],
        responses={
            200: {"content": {m: {} for m in ACCEPTED}},
            406: _ERRORS[415] | {"description": "No supported media type in Accept"},
        }
        | {k: v for k, v in _ERRORS.items() if k != 404},
    )
    async def explain(
        request: Request, key_id: KeyId, form: Annotated[ExplainForm, Depends(form_of)]
    ) -> Response:
        from medlens.explain.explanation import check_request

        media = negotiate(request.headers.get("accept"))
        if media is None:
            raise Problem(
                406,
                "Not acceptable",
                f"no explanation in {request.headers.get('accept')!r}; ask for one of "
                f"{', '.join(ACCEPTED)} in the Accept header",
            )
        sent = await request.form()  # parsed once already; an empty field reads as absent
        if "query" in sent and form.query is None:
            raise EmptyInput('the query is empty: describe what to look for, e.g. "veil"')
        if "finding" in sent and form.finding is None:
            raise EmptyInput("the finding id is empty; omit the field to explain the top finding")
        svc = request.app.state.service
        svc.require_ready()
        form.query = check_request(
            form.finding, form.query, form.method, form.domain
        )  # before any work
        raw = await form.image.read()
        if not raw:
            raise EmptyInput("the uploaded file is empty; choose an image or DICOM file")
        rid = request.state.request_id
        body = await _run(svc, _explain_job, svc, raw, form, media, key_id, rid)
        return Response(body, media_type=media, headers={"X-Audit-ID": rid})

    return r
