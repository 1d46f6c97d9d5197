"""The MedLens HTTP service (FastAPI): ``create_app()`` builds it, ``medlens serve`` runs it.

One process holds one model, loaded once in the background at start-up (``/healthz``
answers at once, ``/readyz`` when the model is warm). Model work runs in a bounded
worker pool (see ``pool.py``); every analysis is written to the audit trail before its
answer leaves the service.
"""

# No ``from __future__ import annotations``: the routes' form and query types are built
# per app from the knowledge packs (build_router), so their annotations must be objects.

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medlens import __version__
from medlens.analysis.context import given_fields
from medlens.analysis.result import Analysis
from medlens.api import problems
from medlens.api.cases import CaseSearch, load_case_search
from medlens.api.keys import KeyRejected, KeyStore
from medlens.api.pool import JobTimeout, Overloaded, WorkerPool
from medlens.api.problems import Problem
from medlens.audit import AuditLog
from medlens.config import Settings, get_settings
from medlens.errors import ConfigError, EmptyInput, MedLensError, OutOfDomain
from medlens.knowledge import domains, load_domain, use_pack_dirs

log = logging.getLogger("medlens.api")
# The current request's id, for log lines written below the routes (timeouts).
REQUEST_ID: ContextVar[str] = ContextVar("medlens_request_id", default="-")

LOCAL_KEY_ID = "local"  # audit key id for unauthenticated loopback requests
_NO_LIBRARY = "no case library built yet: build one (see docs/service.md) and restart the API"


class ProblemModel(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None


_ERRORS = {
    s: {"model": ProblemModel, "description": d}
    for s, d in {
        400: "Bad input",
        401: "Missing or invalid API key",
        403: "Revoked API key",
        413: "Body or image over the size limit",
        415: "Not multipart, or not a supported image",
        422: "Invalid field or undecodable image",
        503: "Model not ready, overloaded (see Retry-After) or no case library",
        504: "Analysis timed out",
    }.items()
}


@dataclass
class Service:
    """Everything the routes share; one per app."""

    settings: Settings
    lens: Any  # medlens.pipeline.MedLens
    pool: WorkerPool
    audit: AuditLog
    keys: KeyStore
    require_key: bool
    cases: CaseSearch | None = None
    cases_given: bool = False
    ready: bool = False
    ready_error: str | None = None
    load_s: float | None = None
    # Set by the server process (it owns the runtime); None leaves torch's own choice, as
    # an app built inside another process (tests, notebooks) must not change it.
    torch_threads: int | None = None
    capabilities: dict[str, bool] = field(
        default_factory=lambda: {
            "analyze": True,
            "search": False,
            "explain": False,
            "report": False,
        }
    )

    def load(self) -> None:
        """Load the model, warm every domain's prompt cache, connect the case library."""
        t0 = time.perf_counter()
        try:
            if self.torch_threads:
                from medlens.models.registry import set_inference_threads

                # Before the first forward: each pool thread takes the count on first use.
                set_inference_threads(self.torch_threads)
            enc = self.lens.encoder
            self.lens.warm()
            if not self.cases_given:
                self.cases = load_case_search(self.settings, enc.fingerprint)
            if self.cases is not None and self.cases.fingerprint != enc.fingerprint:
                log.warning("case library built with another encoder; search disabled")
                self.cases = None
            self.capabilities["search"] = self.cases is not None
            self.load_s = time.perf_counter() - t0
            self.ready = True
            log.info("model %s ready in %.1f s", self.lens.model_name, self.load_s)
            warm_text = getattr(enc, "warm_text", None)
            if warm_text is not None:  # ready for images now; symptom text soon after
                try:
                    warm_text()
                except Exception:  # a text request will report it; images still work
                    log.exception("text tower failed to load")
        except MedLensError as exc:
            self.ready_error = f"{type(exc).__name__}: {exc}"
            log.error("model failed to load: %s", self.ready_error)
        except Exception as exc:  # keep serving /healthz and say why /readyz fails
            self.ready_error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")

    def require_ready(self) -> None:
        if self.ready:
            return
        if self.ready_error:
            raise Problem(503, "Model unavailable", self.ready_error, headers={"Retry-After": "60"})
        raise Problem(
            503, "Model loading", "the model is still loading", headers={"Retry-After": "5"}
        )

    def model_info(self) -> dict[str, str] | None:
        if not self.ready:
            return None
        return {"name": self.lens.model_name, "fingerprint": self.lens.encoder.fingerprint}


def _service(request: Request) -> Service:
    return request.app.state.service


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer mlk_...")
_header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: mlk_...")


def api_key_id(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header_key)],
) -> str:
    """The id of the caller's key; ``local`` for key-less loopback use.

    A presented key is always checked (a wrong key is a client bug worth surfacing);
    a missing key is accepted only when the server listens on loopback alone.
    """
    decided = getattr(request.state, "api_key_id", None)  # KeyGate ran before the body
    if decided is not None:
        return decided
    presented = bearer.credentials if bearer else header_key
    key_id = check_key(_service(request), presented)
    request.state.api_key_id = key_id
    return key_id


def check_key(svc: Service, presented: str | None) -> str:
    """The caller's key id, or the Problem to answer (401/403; 503 if the key file is
    unreadable: the server's fault, and its path is for the log, not the client)."""
    if presented is None and not svc.require_key:
        return LOCAL_KEY_ID
    try:
        return svc.keys.check(presented).id
    except KeyRejected as exc:
        title = "Unauthorized" if exc.status == 401 else "Forbidden"
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        raise Problem(exc.status, title, exc.detail, headers=headers) from None
    except ConfigError as exc:
        log.error("API keys cannot be checked: %s", exc)
        raise Problem(
            503,
            "Key store unavailable",
            "the server cannot read its API key store; the operator has been told in the log",
            headers={"Retry-After": "60"},
        ) from None


def _presented_key(scope: Scope) -> str | None:
    """The key a request carries (Bearer first, then X-API-Key), read from raw headers."""
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, credentials = auth.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    key = headers.get(b"x-api-key")
    return key.decode("latin-1") if key else None


class KeyGate:
    """Check the API key from the headers before anything reads the body.

    FastAPI parses a multipart form (spooling uploads to disk) before it runs the route's
    dependencies, so a dependency alone would read a 60 MiB upload and only then answer
    401. Only the liveness probes are open; the docs and the schema follow the key rule.
    """

    OPEN = frozenset({"/healthz", "/readyz"})

    def __init__(self, app: ASGIApp, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            await self.app(scope, receive, send)
            return
        try:
            key_id = check_key(self.service, _presented_key(scope))
        except Problem as problem:
            await problems.problem_response(problem, Request(scope))(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key_id"] = key_id
        await self.app(scope, receive, send)


def require_multipart(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise Problem(
            415,
            "Unsupported media type",
            f"send multipart/form-data with the file in field 'image' (got {ctype or 'none'!r})",
        )


KeyId = Annotated[str, Depends(api_key_id)]


@dataclass
class AnalysisForm:
    """The multipart form every image endpoint takes (analyze, report). ``context``: the
    clinical-context fields that were filled in (analyze only), validated by the pipeline
    against the chosen domain's vocabulary (``InvalidContext`` -> 400)."""

    image: UploadFile
    symptoms: str | None
    domain: str
    top_k: int
    context: dict[str, str] | None = None
    dermoscopy: UploadFile | None = None


def _analyze_job(
    svc: Service,
    raw: bytes,
    form: AnalysisForm,
    key_id: str,
    request_id: str,
    dermoscopy: bytes | None = None,
) -> dict[str, Any]:
    """Runs in a pool thread: decode → analyze → audit. Returns the analysis JSON."""
    lens = svc.lens
    decoded = lens.decode(raw, form.image.filename)
    try:
        result = lens.analyze(
            decoded,
            symptoms=form.symptoms,
            context=form.context,
            domain=form.domain,
            top_k=form.top_k,
            dermoscopy=dermoscopy,
        ).to_dict()
    except OutOfDomain as exc:  # an abstention is a decision too: it is audited
        audit(
            svc, abstention(lens, decoded, exc), decoded, raw, key_id=key_id, request_id=request_id
        )
        raise
    audit(svc, result, decoded, raw, key_id=key_id, request_id=request_id)
    return result


def abstention(lens: Any, decoded: Any, exc: OutOfDomain) -> dict[str, Any]:
    """The audit record of an abstention: what was sent (hash, context), which model
    declined and why; no domain, no findings, triage level ``abstained``."""
    return {
        "outcome": "abstained",
        "reason": str(exc),
        "domain": "none",
        "model": {
            "name": lens.model_name,
            "fingerprint": lens.encoder.fingerprint,
            "calibration": lens.card.calibration.id,
        },
        "input": {"content_hash": decoded.content_hash, "context": decoded.context.to_dict()},
        "findings": [],
        "triage": {"level": "abstained", "reason": str(exc)},
    }


def negotiate_media(
    accept: str | None, accepted: Sequence[str], default: str, ranges: dict[str, str]
) -> str | None:
    """The media type to answer with for an ``Accept`` header: the highest-q entry that
    is one of ``accepted`` or a range in ``ranges`` (e.g. ``{"*/*": default}``); None
    when none is (→ 406). No header means ``default``."""
    if not accept or not accept.strip():
        return default
    ranked: list[tuple[float, int, str]] = []
    for i, part in enumerate(accept.split(",")):
        fields = [x.strip() for x in part.split(";")]
        media, q = fields[0].lower(), 1.0
        for p in fields[1:]:
            if p.lower().startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if media and q > 0:
            ranked.append((-q, i, media))
    for _, _, media in sorted(ranked):
        if media in accepted:
            return media
        if media in ranges:
            return ranges[media]
    return None


def audit(
    svc: Service, output: dict[str, Any], decoded: Any, raw: bytes, *, key_id: str, request_id: str
) -> None:
    """Append one analysis (``output``: its JSON, plus what was sent) to the audit trail;
    input bytes and identifiers only where the site turned that on."""
    s = svc.settings
    svc.audit.append(
        output,
        request_id=request_id,
        api_key_id=key_id,
        knowledge_version=(
            load_domain(output["domain"]).source_hash if output["domain"] in domains() else "-"
        ),
        case_library_version=svc.cases.version if svc.cases is not None else None,
        input_bytes=raw if s.audit_store_inputs else None,
        identifiers=dict(decoded.identifiers.values) if s.audit_store_identifiers else None,
    )


async def _run(svc: Service, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return await svc.pool.run(fn, *args, timeout_s=svc.settings.api_timeout_s)
    except Overloaded as exc:
        raise Problem(
            503,
            "Overloaded",
            f"all {svc.pool.capacity} analysis slots are busy; retry after {exc.retry_after_s} s",
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from None
    except JobTimeout as exc:
        # Ids only: never the file name, symptoms or anything else the caller sent.
        log.warning(
            "job timed out after %s s (MEDLENS_API_TIMEOUT_S) rid=%s",
            svc.settings.api_timeout_s,
            REQUEST_ID.get(),
        )
        raise Problem(504, "Timed out", f"{exc} (MEDLENS_API_TIMEOUT_S)") from None


def _symptoms(value: str | None) -> str | None:
    """An empty form field means 'no symptoms' (HTML forms always send the field)."""
    return value if value is not None and value.strip() else None


def _context_choices(domain_ids: Sequence[str]) -> dict[str, str]:
    """For the schema: the accepted sexes, body sites and history items of the packs
    that take clinical context (data, so a new site appears by itself)."""
    sexes: list[str] = []
    sites: list[str] = []
    items: list[str] = []
    for d in domain_ids:
        vocab = load_domain(d).domain.context
        if vocab is not None:
            sexes += [t.id for t in vocab.sexes]
            sites += [t.id for t in vocab.body_sites]
            items += [t.id for t in vocab.history]
    return {
        k: ", ".join(dict.fromkeys(v)) or "-"
        for k, v in (("sexes", sexes), ("sites", sites), ("items", items))
    }


def public_base_url(settings: Settings) -> str:
    """Where clients reach the API: MEDLENS_PUBLIC_URL, else http://api_host:api_port."""
    return settings.public_url or f"http://{settings.api_host}:{settings.api_port}"


def _case_out(request: Request, case: Any) -> dict[str, Any]:
    """A case as JSON; its link is built from the configured base URL, never from the
    request's Host header (a forged Host would otherwise be echoed into the link)."""
    out = dict(case)
    out["id"] = str(out["id"])
    path = request.app.url_path_for("case_thumbnail", case_id=out["id"])
    out["thumbnail_url"] = public_base_url(_service(request).settings) + str(path)
    return out


def _finding_summary(domain_id: str, f: Any) -> dict[str, Any]:
    return {
        "id": f.id,
        "domain": domain_id,
        "name": f.name,
        "synonyms": list(f.synonyms),
        "risk": f.risk,
        "icd10": list(f.icd10),
        "snomed": f.snomed,
    }


def analysis_form(
    domain_ids: Sequence[str], *, context: bool = False
) -> Callable[..., AnalysisForm]:
    """The FastAPI dependency that reads ``AnalysisForm``; its domain choices are the
    knowledge packs' ids (so a new pack appears in the schema by itself). ``context``:
    also read the optional clinical-context fields (``/v1/analyze``)."""
    DomainChoice = Literal[("auto", *domain_ids)]  # type: ignore[valid-type]

    def form(
        image: Annotated[UploadFile, File(description="PNG, JPEG, BMP, TIFF, WebP or DICOM")],
        symptoms: Annotated[str | None, Form(description="Free-text symptoms")] = None,
        domain: Annotated[DomainChoice, Form()] = "auto",
        top_k: Annotated[int, Form(ge=1, le=100)] = 5,
    ) -> AnalysisForm:
        return AnalysisForm(image, _symptoms(symptoms), domain, top_k)

    if not context:
        return form
    c = _context_choices(domain_ids)
    note = " Clinical context: optional; empty means not given (unknown stays unknown)."

    def form_with_context(
        image: Annotated[UploadFile, File(description="PNG, JPEG, BMP, TIFF, WebP or DICOM")],
        symptoms: Annotated[
            str | None,
            Form(description="Free-text symptoms (in dermatology also read into the fields below)"),
        ] = None,
        domain: Annotated[DomainChoice, Form()] = "auto",
        top_k: Annotated[int, Form(ge=1, le=100)] = 5,
        age: Annotated[str | None, Form(description="Age in years, 0-120." + note)] = None,
        sex: Annotated[str | None, Form(description=f"One of {c['sexes']}." + note)] = None,
        site: Annotated[
            str | None, Form(description=f"Body site, one of {c['sites']}." + note)
        ] = None,
        fitzpatrick: Annotated[
            str | None, Form(description="Fitzpatrick skin type, 1-6 or I-VI." + note)
        ] = None,
        diameter_mm: Annotated[
            str | None, Form(description="Lesion diameter in mm, 0.1-300." + note)
        ] = None,
        duration_days: Annotated[
            str | None, Form(description="Days since the lesion appeared." + note)
        ] = None,
        history: Annotated[
            str | None,
            Form(
                description=f"Comma-separated history items ({c['items']}); prefix no- for "
                "a 'no', e.g. grew,bleed,no-itch. An item left out is unknown." + note
            ),
        ] = None,
        dermoscopy: Annotated[
            UploadFile | None,
            File(
                description="Optional: the dermoscopy image of the lesion that `image` (a "
                "clinical photo) shows (dermatology); both are scored together, weighted as "
                "measured on validation pairs (input.dermoscopy.weight)"
            ),
        ] = None,
    ) -> AnalysisForm:
        fields = given_fields(
            age=age,
            sex=sex,
            site=site,
            fitzpatrick=fitzpatrick,
            diameter_mm=diameter_mm,
            duration_days=duration_days,
            history=history,
        )
        return AnalysisForm(image, _symptoms(symptoms), domain, top_k, fields, dermoscopy)

    return form_with_context


async def read_upload(request: Request, form: AnalysisForm) -> tuple[Service, bytes]:
    """The service (refusing while the model loads) and the uploaded bytes (never empty)."""
    svc = _service(request)
    svc.require_ready()
    raw = await form.image.read()
    if not raw:
        raise EmptyInput("the uploaded file is empty; choose an image or DICOM file")
    return svc, raw


def build_router(domain_ids: Sequence[str] | None = None) -> APIRouter:
    ids = tuple(domain_ids or domains())
    # Built from the knowledge packs (data, MEDLENS_KNOWLEDGE_PATH included), so a new
    # domain appears in the schema by itself.
    DomainChoice = Literal[("auto", *ids)]  # type: ignore[valid-type]
    PackChoice = Literal[ids]  # type: ignore[valid-type]
    form_of = analysis_form(ids, context=True)
    r = APIRouter()

    @r.get("/healthz", tags=["service"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @r.get(
        "/readyz",
        tags=["service"],
        summary="The model is loaded and warm",
        responses={503: _ERRORS[503]},
    )
    async def readyz(request: Request) -> dict[str, Any]:
        svc = _service(request)
        svc.require_ready()
        return {"status": "ready", "model": svc.model_info(), "load_s": round(svc.load_s or 0, 2)}

    @r.get("/v1/info", tags=["service"], summary="Version, model, limits and capabilities")
    async def info(request: Request) -> dict[str, Any]:
        svc = _service(request)
        s = svc.settings
        return {
            "medlens_version": __version__,
            "ready": svc.ready,
            "model": svc.model_info(),
            "domains": list(domains()),
            "capabilities": svc.capabilities,
            "auth_required": svc.require_key,
            "limits": {
                "max_upload_bytes": s.api_max_upload_bytes,
                "max_pixels": s.max_pixels,
                "max_text_chars": s.max_text_chars,
                "timeout_s": s.api_timeout_s,
                "workers": svc.pool.workers,
                "torch_threads": svc.torch_threads,
                "queue": svc.pool.queue,
            },
            "disclaimer": "Research software for decision support only; not a diagnosis.",
        }

    @r.post(
        "/v1/analyze",
        tags=["analysis"],
        summary="Analyze one image (+ optional symptoms and clinical context): differential, "
        "triage, knowledge",
        description="Returns the analysis JSON documented in docs/analysis.md and by the "
        "response schema below (the same as `medlens analyze --json`). The clinical-context "
        "fields (age, sex, site, fitzpatrick, diameter_mm, duration_days, history) are "
        "optional; an impossible value is a 400 problem naming the field. What was used is "
        "in the result's `context` object. The request id is in the X-Request-ID header; it "
        "is also the audit record id.",
        response_model=Analysis,
        dependencies=[Depends(require_multipart)],
        responses={k: v for k, v in _ERRORS.items() if k != 404},
    )
    async def analyze(
        request: Request, key_id: KeyId, form: Annotated[AnalysisForm, Depends(form_of)]
    ) -> JSONResponse:
        svc, raw = await read_upload(request, form)
        derm = await form.dermoscopy.read() if form.dermoscopy is not None else None
        if derm is not None and not derm and form.dermoscopy.filename:
            raise EmptyInput("the dermoscopy image is an empty file; choose one or leave it out")
        rid = request.state.request_id
        derm = derm or None  # a form's empty file field means "no dermoscopy image"
        result = await _run(svc, _analyze_job, svc, raw, form, key_id, rid, derm)
        return JSONResponse(result, headers={"X-Audit-ID": rid})

    @r.post(
        "/v1/search",
        tags=["cases"],
        summary="Similar cases to an image or a text",
        dependencies=[Depends(require_multipart)],
        responses={k: v for k, v in _ERRORS.items() if k != 404},
    )
    async def search(
        request: Request,
        key_id: KeyId,
        image: Annotated[UploadFile | None, File(description="Query image")] = None,
        text: Annotated[str | None, Form(description="Query text, e.g. a finding")] = None,
        domain: Annotated[DomainChoice, Form()] = "auto",
        k: Annotated[int, Form(ge=1, le=50)] = 8,
    ) -> dict[str, Any]:
        svc = _service(request)
        svc.require_ready()
        if svc.cases is None:
            raise Problem(503, "No case library", _NO_LIBRARY, kind="no-case-library")
        raw = await image.read() if image is not None else b""
        text = _symptoms(text)
        if not raw and text is None:
            raise Problem(422, "Invalid request", "send an image (field 'image') or a 'text'")
        cases = svc.cases

        def job() -> tuple[list[Any], dict[str, Any]]:
            enc = svc.lens.encoder
            if raw:
                decoded = svc.lens.decode(raw, image.filename if image else None)
                emb = enc.embed_images([decoded.pixels])[0]
                query = {"kind": "image", "content_hash": decoded.content_hash}
            else:
                from medlens.analysis.symptoms import clean_symptoms, text_hash

                cleaned = clean_symptoms(text, svc.settings.max_text_chars) or ""
                emb = enc.embed_texts([cleaned])[0]
                query = {"kind": "text", "sha256": text_hash(cleaned, svc.settings)}
            hits = cases.search(emb, k=k, domain=None if domain == "auto" else domain)
            return list(hits), query

        hits, query = await _run(svc, job)
        return {
            "query": query,
            "library": {"version": cases.version},
            "results": [_case_out(request, h) for h in hits],
        }

    @r.get(
        "/v1/cases/{case_id}",
        tags=["cases"],
        summary="One case of the library",
        responses={k: _ERRORS[k] for k in (401, 403, 503)} | {404: {"model": ProblemModel}},
    )
    async def get_case(request: Request, case_id: str, key_id: KeyId) -> dict[str, Any]:
        cases = _cases(request)
        case = cases.get_case(case_id)
        if case is None:
            raise Problem(404, "Not found", f"no case with id {case_id!r}")
        return _case_out(request, case)

    @r.get(
        "/v1/cases/{case_id}/thumbnail",
        tags=["cases"],
        name="case_thumbnail",
        summary="A case's preview image",
        response_class=Response,
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}}
        | {k: _ERRORS[k] for k in (401, 403, 503)}
        | {404: {"model": ProblemModel}},
    )
    async def case_thumbnail(request: Request, case_id: str, key_id: KeyId) -> Response:
        thumb = _cases(request).thumbnail(case_id)
        if thumb is None:
            raise Problem(404, "Not found", f"no thumbnail for case {case_id!r}")
        data, media_type = thumb
        return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    @r.get("/v1/findings", tags=["knowledge"], summary="Findings of the knowledge packs")
    async def findings(
        key_id: KeyId,
        domain: Annotated[PackChoice | None, Query()] = None,
    ) -> dict[str, Any]:
        wanted = [domain] if domain else list(ids)
        rows = [_finding_summary(d, f) for d in wanted for f in load_domain(d).findings]
        return {"findings": rows}

    @r.get(
        "/v1/findings/{finding_id}",
        tags=["knowledge"],
        summary="One finding: description by section, next step, codes, source",
        responses={404: {"model": ProblemModel}},
    )
    async def finding(
        finding_id: str,
        key_id: KeyId,
        domain: Annotated[PackChoice | None, Query()] = None,
    ) -> dict[str, Any]:
        for d in [domain] if domain else ids:
            pack = load_domain(d)
            if finding_id in pack.finding_ids:
                f = pack.finding(finding_id)
                return {
                    **_finding_summary(d, f),
                    "description": f.description.sections(),
                    "next_step": f.next_step,
                    "source": f"medlens/knowledge/{d}.yaml#{f.id}",
                    "knowledge_version": pack.source_hash,
                }
        raise Problem(404, "Not found", f"no finding with id {finding_id!r}")

    return r


def _cases(request: Request) -> CaseSearch:
    svc = _service(request)
    svc.require_ready()
    if svc.cases is None:
        raise Problem(503, "No case library", _NO_LIBRARY, kind="no-case-library")
    return svc.cases


class RequestContext:
    """Give each request an id (X-Request-ID, audit id) and log one line per request.

    Plain ASGI rather than ``@app.middleware``: Starlette's BaseHTTPMiddleware wraps the
    receive channel in a task group, which turns the upload limit's 413 into a 400.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        token = REQUEST_ID.set(rid)
        status, t0 = 0, time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # An unhandled error would reach Starlette's outermost ServerErrorMiddleware,
            # whose 500 bypasses this middleware: answer it here, with the request id.
            log.exception("unexpected error on %s rid=%s", scope["path"], rid)
            if status:
                raise  # the response has started; nothing more can be sent
            detail = "an unexpected error occurred; it has been logged with the request id"
            resp = problems.problem_response(
                Problem(500, "Internal error", detail), Request(scope, receive)
            )
            await resp(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
            log.info(
                "%s %s %d %.0f ms key=%s rid=%s",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - t0) * 1000,
                state.get("api_key_id", "-"),
                rid,
            )


def create_app(
    settings: Settings | None = None,
    *,
    lens: Any = None,
    require_key: bool | None = None,
    case_search: CaseSearch | None = None,
    extra_routers: Sequence[tuple[APIRouter, str]] = (),
    load_in_background: bool = True,
    torch_threads: int | None = None,
) -> FastAPI:
    """Build the service.

    ``require_key`` defaults to ``settings.api_require_key`` (the server command turns it
    on whenever it listens beyond loopback). ``case_search`` overrides the
    ``load_case_search`` hook. ``extra_routers`` is the hook for later features
    (heatmaps, reports): each (router, capability name) is mounted and announced in
    ``/v1/info`` capabilities, which the UI reads to show its panels. ``torch_threads``
    sets torch's threads per forward when the model loads (the server process passes
    ``settings.service_torch_threads``; None leaves the host process's setting alone).
    """
    from medlens.pipeline import MedLens

    s = settings or get_settings()
    use_pack_dirs(s.knowledge_dirs)
    svc = Service(
        settings=s,
        lens=lens or MedLens(settings=s),
        pool=WorkerPool(s.api_workers, s.api_queue),
        audit=AuditLog.from_settings(s),
        keys=KeyStore(s.api_keys_file),
        require_key=s.api_require_key if require_key is None else require_key,
        cases=case_search,
        cases_given=case_search is not None,
        torch_threads=torch_threads,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=svc.load, name="medlens-load", daemon=True)
        loader.start()
        if not load_in_background:
            await asyncio.to_thread(loader.join)
        try:
            yield
        finally:
            svc.pool.shutdown()
            svc.audit.close()

    app = FastAPI(
        title="MedLens API",
        version=__version__,
        description="Zero-shot differential, triage and clinical knowledge for medical images. "
        "**Research software for decision support only; not a diagnosis.**",
        lifespan=lifespan,
        docs_url=None,  # served by medlens.api.docs, without a CDN
        redoc_url=None,
    )
    app.state.service = svc
    problems.install(app)
    from medlens.api import docs

    docs.install(app)
    app.include_router(build_router(domains()))
    from medlens.api.explain import build_explain_router  # POST /v1/explain
    from medlens.api.report import build_report_router  # POST /v1/report

    extra_routers = (
        (build_report_router(domains()), "report"),
        (build_explain_router(domains()), "explain"),
        *extra_routers,
    )
    for router, capability in extra_routers:
        app.include_router(router)
        svc.capabilities[capability] = True

    app.add_middleware(problems.UploadLimit, limit=s.api_max_upload_bytes)
    app.add_middleware(KeyGate, service=svc)  # before anything reads the body
    app.add_middleware(RequestContext)  # outermost: every answer carries X-Request-ID
    if s.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(s.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=["X-Request-ID", "X-Audit-ID", "Retry-After"],
        )
    return app
