"""Errors as RFC 7807 problem JSON (``application/problem+json``), never a traceback.

Every MedLens typed error maps to one status code here, so the service, the CLI and
the docs agree on what a failure means (docs/service.md lists the table).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medlens.errors import (
    ConfigError,
    CorruptImage,
    EmptyInput,
    ExtremeAspectRatio,
    ImageTooLarge,
    InputError,
    InvalidText,
    MedLensError,
    ModelUnavailable,
    NoPixelData,
    OutOfDomain,
    UnsupportedImage,
)

log = logging.getLogger("medlens.api")

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:medlens:problem:"

# Most specific class first: the first isinstance match wins.
STATUS_BY_ERROR: list[tuple[type[MedLensError], int, str]] = [
    (UnsupportedImage, 415, "Unsupported image type"),
    (ImageTooLarge, 413, "Image too large"),
    (ExtremeAspectRatio, 422, "Extreme aspect ratio"),
    (OutOfDomain, 422, "Out of domain"),
    (EmptyInput, 400, "Empty input"),
    (CorruptImage, 422, "Corrupt image"),
    (NoPixelData, 422, "No pixel data"),
    (InvalidText, 422, "Invalid symptom text"),
    (InputError, 400, "Invalid input"),
    (ModelUnavailable, 503, "Model unavailable"),
    (ConfigError, 400, "Invalid request"),
    (MedLensError, 400, "Request failed"),
]

_HTTP_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid request",
    503: "Service unavailable",
    504: "Timed out",
}


class Problem(Exception):
    """An HTTP failure the API raises on purpose (auth, overload, not found, ...)."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        kind: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail
        self.kind = kind or _slug(title)
        self.headers = headers or {}


class BodyTooLarge(HTTPException):
    """Raised from the receive channel; a FastAPI HTTPException so FastAPI's body parser
    passes it through untouched (it re-raises those and turns anything else into 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()).strip("-")


def problem_body(
    status: int, title: str, detail: str, *, kind: str, request: Request | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + kind,
        "title": title,
        "status": status,
        "detail": detail,
    }
    if request is not None:
        body["instance"] = request.url.path
        rid = getattr(request.state, "request_id", None)
        if rid:
            body["request_id"] = rid
    return body


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    """``problem`` as an RFC 7807 ``application/problem+json`` response."""
    body = problem_body(
        problem.status, problem.title, problem.detail, kind=problem.kind, request=request
    )
    return JSONResponse(
        body, status_code=problem.status, headers=problem.headers or None, media_type=PROBLEM_JSON
    )


def for_error(exc: MedLensError) -> tuple[int, str]:
    for cls, status, title in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status, title
    return 400, "Request failed"  # pragma: no cover - MedLensError is last in the table


def document_problems(app: FastAPI) -> None:
    """Make ``/openapi.json`` say what errors really are: every 4xx/5xx response body
    is ``application/problem+json`` (FastAPI documents a response model as
    ``application/json``), so clients and contract tests see the media type served."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        for item in schema.get("paths", {}).values():
            for op in item.values():
                for code, resp in (op.get("responses") or {}).items():
                    content = resp.get("content") or {}
                    if code[:1] in "45" and "application/json" in content:
                        resp["content"] = {PROBLEM_JSON: content["application/json"]}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI) -> None:
    """Register handlers so every error leaves the API as problem JSON."""
    document_problems(app)

    @app.exception_handler(MedLensError)
    async def _medlens(request: Request, exc: MedLensError) -> JSONResponse:
        status, title = for_error(exc)
        headers = {"Retry-After": "30"} if status == 503 else None
        problem = Problem(status, title, str(exc), kind=_slug(type(exc).__name__), headers=headers)
        return problem_response(problem, request)

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = _HTTP_TITLES.get(exc.status_code, "HTTP error")
        detail = exc.detail if isinstance(exc.detail, str) else title
        problem = Problem(exc.status_code, title, detail, headers=dict(exc.headers or {}))
        return problem_response(problem, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", "")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5])
        body = problem_body(422, "Invalid request", detail, kind="invalid-request", request=request)
        body["errors"] = errors
        return JSONResponse(body, status_code=422, media_type=PROBLEM_JSON)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        detail = "an unexpected error occurred; it has been logged with the request id"
        return problem_response(Problem(500, "Internal error", detail), request)


class UploadLimit:
    """Refuse request bodies over ``limit`` bytes with 413 before reading them when
    Content-Length says so, and while reading when it does not (chunked uploads)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            detail = (
                f"the request body has {int(length)} bytes; the limit is {self.limit} "
                "(MEDLENS_API_MAX_UPLOAD_BYTES)"
            )
            resp = problem_response(Problem(413, "Content too large", detail))
            await resp(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return msg

        await self.app(scope, limited, send)
