"""A small client for the MedLens API, used by the Streamlit UI (and handy in notebooks).

Errors come back as ``ApiError`` carrying the problem JSON's status, title and detail,
so the UI can show the service's own one-line message.
"""

from __future__ import annotations

from typing import Any

import httpx


class ApiError(Exception):
    def __init__(self, status: int, title: str, detail: str, retry_after: str | None = None):
        super().__init__(f"{title}: {detail}")
        self.status, self.title, self.detail, self.retry_after = status, title, detail, retry_after


def context_form(context: dict[str, Any] | None) -> dict[str, str]:
    """Clinical-context values as the analyze form's fields: blanks and unanswered
    history items are left out, never sent as "no"."""
    out: dict[str, str] = {}
    for key, value in (context or {}).items():
        if isinstance(value, dict):
            answered = [(k, v) for k, v in value.items() if v is not None]
            value = ",".join(k if v else f"no-{k}" for k, v in answered)
        if value is None or not str(value).strip():
            continue
        out[key] = str(value).strip()
    return out


class ApiClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 120.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # trust_env=False: a proxy from the environment must never see images or keys.
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, trust_env=False
        )
        self.base_url = base_url.rstrip("/")

    def close(self) -> None:
        self._http.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code < 400:
            return r
        try:
            body = r.json()
            title, detail = body.get("title", "Error"), body.get("detail", r.text)
        except ValueError:
            title, detail = f"HTTP {r.status_code}", r.text[:200]
        raise ApiError(r.status_code, title, detail, r.headers.get("Retry-After"))

    def _get(self, path: str, **params: Any) -> Any:
        try:
            return self._check(self._http.get(path, params=params or None)).json()
        except httpx.TransportError as exc:
            raise ApiError(0, "API unreachable", f"{self.base_url}: {exc}") from exc

    def _post(self, path: str, files: dict[str, Any], data: dict[str, Any]) -> Any:
        return self._post_raw(path, files, data).json()

    def _post_raw(
        self, path: str, files: dict[str, Any], data: dict[str, Any], accept: str | None = None
    ) -> httpx.Response:
        headers = {"Accept": accept} if accept else None
        try:
            return self._check(self._http.post(path, files=files, data=data, headers=headers))
        except httpx.TransportError as exc:
            raise ApiError(0, "API unreachable", f"{self.base_url}: {exc}") from exc

    # -- endpoints ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return self._get("/v1/info")

    def analyze(
        self,
        image: bytes,
        filename: str,
        *,
        symptoms: str | None = None,
        domain: str = "auto",
        top_k: int = 5,
        context: dict[str, Any] | None = None,
        dermoscopy: tuple[str, bytes] | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/analyze``. ``context``: clinical-context form fields (age, sex, site,
        fitzpatrick, diameter_mm, duration_days, history); None and empty values are not
        sent (unknown stays unknown). ``history`` may be a mapping item -> True/False/None
        (None: unanswered, left out) or the API's comma list (``grew,no-itch``).
        ``dermoscopy``: (filename, bytes) of the dermoscopy image of the same lesion."""
        data: dict[str, Any] = {"domain": domain, "top_k": str(top_k)}
        if symptoms and symptoms.strip():
            data["symptoms"] = symptoms
        data.update(context_form(context))
        files = {"image": (filename, image)}
        if dermoscopy is not None:
            files["dermoscopy"] = dermoscopy
        return self._post("/v1/analyze", files, data)

    def search(
        self, image: bytes, filename: str, *, domain: str = "auto", k: int = 8
    ) -> dict[str, Any]:
        return self._post(
            "/v1/search", {"image": (filename, image)}, {"domain": domain, "k": str(k)}
        )

    def explain(self, image: bytes, filename: str, **form: str) -> dict[str, Any]:
        """``POST /v1/explain`` as JSON; ``form``: domain, method, finding or query."""
        return self._post("/v1/explain", {"image": (filename, image)}, form)

    def report(self, image: bytes, filename: str, media: str, **form: str) -> bytes:
        """``POST /v1/report`` in ``media`` (text/markdown, application/pdf,
        application/fhir+json); ``form``: domain, top_k, symptoms."""
        return self._post_raw("/v1/report", {"image": (filename, image)}, form, media).content

    def finding(self, finding_id: str, domain: str | None = None) -> dict[str, Any]:
        return self._get(f"/v1/findings/{finding_id}", **({"domain": domain} if domain else {}))

    def fetch(self, url: str) -> bytes:
        """Raw bytes of an absolute or API-relative URL (case thumbnails)."""
        try:
            return self._check(self._http.get(url)).content
        except httpx.TransportError as exc:
            raise ApiError(0, "API unreachable", f"{self.base_url}: {exc}") from exc
