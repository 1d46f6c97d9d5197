"""The HTTP service against the real model, real sample images and a real audit DB."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
import typer
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis.checks import positive_data_acceptance
from typer.testing import CliRunner

from medlens.api.app import create_app
from medlens.api.cases import CaseSearch
from medlens.api.keys import KeyStore
from medlens.api.pool import JobTimeout, Overloaded, WorkerPool
from medlens.api.server import is_loopback, needs_key
from medlens.audit import AuditLog
from medlens.config import Settings
from medlens.errors import ConfigError
from medlens.knowledge import domains, load_domain
from medlens.pipeline import MedLens

ISIC = "isic2018-task3-test/images/ISIC_0034524.jpg"
CXR = "cxr-samples/00000001_000.png"
DICOM = "cxr-samples/Fake_MONOHR1.dcm"
PROBLEM = "application/problem+json"


class SampleCases:
    """A real, tiny case library for the tests: sample images with their dataset labels,
    embedded by the service's own encoder, searched by cosine similarity."""

    version = "test-samples-1"

    def __init__(self, lens: MedLens, data_dir: Path):
        import csv

        folder = data_dir / "isic2018-task3-test"
        with open(folder / "labels.csv") as fh:
            rows = list(csv.DictReader(fh))[:12]
        self.paths = {r["image_id"]: folder / "images" / f"{r['image_id']}.jpg" for r in rows}
        self.cases = {
            r["image_id"]: {"id": r["image_id"], "domain": "dermatology", "label": r["dx"],
                            "dataset": "isic2018", "text": f"ISIC 2018 test image, dx {r['dx']}"}
            for r in rows
        }  # fmt: skip
        pixels = [lens.decode(p).pixels for p in self.paths.values()]
        self.emb = lens.encoder.embed_images(pixels)
        self.ids = list(self.paths)
        self.fingerprint = lens.encoder.fingerprint

    def search(self, embedding: np.ndarray, *, k: int = 8, domain: str | None = None) -> list:
        if domain not in (None, "dermatology"):
            return []
        scores = self.emb @ embedding
        order = np.argsort(-scores)[:k]
        return [{**self.cases[self.ids[i]], "score": float(scores[i])} for i in order]

    def get_case(self, case_id: str) -> dict | None:
        return self.cases.get(case_id)

    def thumbnail(self, case_id: str) -> tuple[bytes, str] | None:
        if case_id not in self.paths:
            return None
        img = Image.open(self.paths[case_id]).convert("RGB")
        img.thumbnail((96, 96))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue(), "image/png"


@pytest.fixture(scope="module")
def api_settings(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Settings:
    # A generous job timeout: on a loaded machine the first analyses can take far longer
    # than the 60 s default (the timeout itself is tested with its own settings).
    return Settings(home=tmp_path_factory.mktemp("api_home"), data=data_dir, api_timeout_s=600)


@pytest.fixture(scope="module")
def lens(api_settings: Settings) -> MedLens:
    return MedLens(settings=api_settings)


@pytest.fixture(scope="module")
def cases(lens: MedLens, data_dir: Path) -> SampleCases:
    return SampleCases(lens, data_dir)


def _client(settings: Settings, lens: Any = None, **kw: Any) -> TestClient:
    app = create_app(settings, lens=lens, load_in_background=False, **kw)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(api_settings: Settings, lens: MedLens) -> TestClient:
    with _client(api_settings, lens) as c:
        yield c


def _post_image(c: TestClient, path: Path, **data: Any) -> httpx.Response:
    return c.post("/v1/analyze", files={"image": (path.name, path.read_bytes())}, data=data)


def _is_problem(r: httpx.Response, status: int, kind: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    if kind:
        assert body["type"] == f"urn:medlens:problem:{kind}"
    return body


# -- the happy path ------------------------------------------------------------------------
def test_health_ready_info(client: TestClient, lens: MedLens) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["model"] == {"name": lens.model_name, "fingerprint": lens.encoder.fingerprint}
    info = client.get("/v1/info").json()
    assert info["domains"] == list(domains()) and info["auth_required"] is False
    assert info["capabilities"] == {
        "analyze": True, "search": False, "explain": True, "report": True
    }  # fmt: skip
    assert "/v1/analyze" in client.get("/openapi.json").json()["paths"]
    # An app built inside another process leaves that process's torch threads alone.
    assert info["limits"]["torch_threads"] is None


def test_service_thread_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from medlens.config import Settings, cores

    monkeypatch.setenv("MEDLENS_API_WORKERS", "1")
    monkeypatch.delenv("MEDLENS_API_TORCH_THREADS", raising=False)
    assert Settings().service_torch_threads == cores()
    monkeypatch.setenv("MEDLENS_API_TORCH_THREADS", "3")
    assert Settings().service_torch_threads == 3
    monkeypatch.setenv("MEDLENS_API_TORCH_THREADS", "-1")
    with pytest.raises(ConfigError, match="MEDLENS_API_TORCH_THREADS"):
        Settings().service_torch_threads  # noqa: B018
    monkeypatch.setenv("MEDLENS_API_TORCH_THREADS", "two")
    with pytest.raises(ConfigError, match="not an integer"):
        Settings()


def test_an_abstention_is_a_422_problem_and_is_audited(
    client: TestClient, api_settings: Settings
) -> None:
    from medlens.evaluation.ood_sets import build

    # A brick-wall texture: an image no domain resembles (natural photos are borderline
    # for the gate, docs/ood.md; this test is about the abstention's handling).
    brick = dict(build("textures"))["brick.png"]
    buf = io.BytesIO()
    Image.fromarray(brick).save(buf, format="PNG")
    r = client.post("/v1/analyze", files={"image": ("brick.png", buf.getvalue())})
    body = _is_problem(r, 422, "out-of-domain")
    assert "abstains" in body["detail"]
    rec = AuditLog.from_settings(api_settings).get(r.headers["X-Request-ID"])
    assert rec is not None and rec.triage_level == "abstained" and rec.domain == "none"
    assert rec.output["outcome"] == "abstained" and rec.output["findings"] == []
    assert AuditLog.from_settings(api_settings).verify().ok


def test_analyze_matches_the_library_and_is_audited(
    client: TestClient, lens: MedLens, api_settings: Settings, data_dir: Path
) -> None:
    path = data_dir / ISIC
    r = _post_image(client, path)
    assert r.status_code == 200, r.text
    got = r.json()
    want = lens.analyze(path, filename=path.name).to_dict()
    got.pop("timings_ms"), want.pop("timings_ms")
    assert got == want
    rid = r.headers["X-Request-ID"]
    assert r.headers["X-Audit-ID"] == rid
    rec = AuditLog.from_settings(api_settings).get(rid)
    assert rec is not None and rec.api_key_id == "local"
    assert rec.input_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rec.output["findings"] == got["findings"]
    assert rec.model_fingerprint == lens.encoder.fingerprint


def test_analyze_options_and_no_echo(
    client: TestClient, data_dir: Path, api_settings: Settings
) -> None:
    text = "persistent cough, fever and breathlessness for two weeks"
    r = _post_image(client, data_dir / CXR, symptoms=text, domain="chest_xray", top_k="3")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["domain"] == "chest_xray" and body["domain_detection"]["source"] == "given"
    assert len(body["findings"]) == 3
    from medlens.analysis.symptoms import text_hash

    keyed = text_hash(text, api_settings)  # HMAC with this installation's secret
    assert body["symptoms"]["sha256"] == keyed != hashlib.sha256(text.encode()).hexdigest()
    assert text not in r.text and "fever and breathlessness" not in r.text
    # An empty symptoms field (what an HTML form sends) means "no symptoms".
    r = _post_image(client, data_dir / ISIC, symptoms="  ")
    assert r.status_code == 200 and r.json()["symptoms"] is None


def test_dicom_identifiers_never_leave(client: TestClient, lens: MedLens, data_dir: Path) -> None:
    r = _post_image(client, data_dir / DICOM)
    assert r.status_code == 200, r.text
    assert r.json()["domain_detection"]["source"] == "dicom"
    for value in lens.decode(data_dir / DICOM).identifiers.values.values():
        assert value not in r.text


def test_findings_endpoints(client: TestClient) -> None:
    rows = client.get("/v1/findings").json()["findings"]
    assert len(rows) == sum(len(load_domain(d).findings) for d in domains())
    cxr = client.get("/v1/findings", params={"domain": "chest_xray"}).json()["findings"]
    assert {f["id"] for f in cxr} == set(load_domain("chest_xray").finding_ids)
    mel = client.get("/v1/findings/melanoma").json()
    pack = load_domain("dermatology")
    assert mel["description"] == pack.finding("melanoma").description.sections()
    assert mel["source"] == "medlens/knowledge/dermatology.yaml#melanoma"
    assert mel["knowledge_version"] == pack.source_hash
    _is_problem(client.get("/v1/findings/melanoma", params={"domain": "chest_xray"}), 404)
    _is_problem(client.get("/v1/findings", params={"domain": "cardiology"}), 422)


# -- bad input: 400 / 413 / 415 / 422 ----------------------------------------------------
def test_415_not_multipart_and_not_an_image(client: TestClient) -> None:
    _is_problem(client.post("/v1/analyze", json={"image": "x"}), 415, "unsupported-media-type")
    r = client.post("/v1/analyze", files={"image": ("notes.txt", b"just some text " * 10)})
    _is_problem(r, 415, "unsupported-image")


def test_400_422_bad_fields(client: TestClient, data_dir: Path) -> None:
    _is_problem(client.post("/v1/analyze", files={"image": ("e.png", b"")}), 400, "empty-input")
    png = (data_dir / CXR).read_bytes()
    r = client.post("/v1/analyze", files={"image": ("cut.png", png[: len(png) // 3])})
    _is_problem(r, 422, "corrupt-image")
    body = _is_problem(_post_image(client, data_dir / ISIC, domain="cardiology"), 422)
    assert any("domain" in e["loc"] for e in body["errors"])
    _is_problem(_post_image(client, data_dir / ISIC, symptoms="x" * 5000), 422, "invalid-text")
    _is_problem(client.post("/v1/analyze", data={"domain": "auto"}, files={}), 415)


def test_413_body_and_pixel_limits(api_settings: Settings, lens: MedLens, data_dir: Path) -> None:
    small = replace(api_settings, api_max_upload_bytes=50_000, max_pixels=300 * 300)
    big = (data_dir / CXR).read_bytes()  # ~1 MB PNG, 1024x1024
    assert len(big) > 50_000
    with _client(small, MedLens(settings=small)) as c:
        r = c.post("/v1/analyze", files={"image": ("big.png", big)})
        _is_problem(r, 413)
        # No Content-Length (chunked): the limit is enforced while reading.
        boundary = "medlensboundary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()

        def chunks():
            yield head
            for i in range(0, len(big), 8192):
                yield big[i : i + 8192]
            yield f"\r\n--{boundary}--\r\n".encode()

        r = c.post(
            "/v1/analyze",
            content=chunks(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        _is_problem(r, 413)
        # Under the byte limit but over the pixel limit: ImageTooLarge from the decoder.
        img = Image.new("RGB", (400, 400), "white")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        assert len(buf.getvalue()) < 50_000
        r = c.post("/v1/analyze", files={"image": ("wide.png", buf.getvalue())})
        _is_problem(r, 413, "image-too-large")


# -- auth: 401 / 403 -----------------------------------------------------------------------
def test_401_403_api_keys(api_settings: Settings, lens: MedLens, data_dir: Path) -> None:
    keys = KeyStore(api_settings.api_keys_file)
    plain, entry = keys.create("test client")
    assert entry.sha256 not in plain and plain not in api_settings.api_keys_file.read_text()
    assert oct(api_settings.api_keys_file.stat().st_mode & 0o777) == "0o600"
    with _client(api_settings, lens, require_key=True) as c:
        assert c.get("/healthz").status_code == 200  # probes stay open
        r = c.get("/v1/findings")
        _is_problem(r, 401)
        assert r.headers["WWW-Authenticate"] == "Bearer"
        _is_problem(c.get("/v1/findings", headers={"Authorization": "Bearer mlk_x_y"}), 401)
        forged = plain[:-4] + "AAAA"
        _is_problem(c.get("/v1/findings", headers={"X-API-Key": forged}), 401)
        ok = c.get("/v1/findings", headers={"Authorization": f"Bearer {plain}"})
        assert ok.status_code == 200
        r = c.post(
            "/v1/analyze",
            headers={"X-API-Key": plain},
            files={"image": ("a.jpg", (data_dir / ISIC).read_bytes())},
        )
        assert r.status_code == 200, r.text
        rec = AuditLog.from_settings(api_settings).get(r.headers["X-Request-ID"])
        assert rec.api_key_id == entry.id
        keys.revoke(entry.id)  # takes effect without a restart
        r = c.get("/v1/findings", headers={"Authorization": f"Bearer {plain}"})
        assert "revoked" in _is_problem(r, 403)["detail"]


def test_keys_cli_and_exposure_rule(api_settings: Settings, monkeypatch) -> None:
    from medlens.cli.service import register

    keyfile = api_settings.home / "cli_keys.json"
    monkeypatch.setenv("MEDLENS_API_KEYS_FILE", str(keyfile))
    s = Settings(home=api_settings.home)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    assert needs_key("127.0.0.1", s) is False
    with pytest.raises(ConfigError, match="medlens keys create"):
        needs_key("0.0.0.0", s)
    res = runner.invoke(app, ["keys", "create", "ward 3"])
    assert res.exit_code == 0, res.output
    plain = res.stdout.strip().splitlines()[-1]
    assert plain.startswith("mlk_") and needs_key("0.0.0.0", s) is True
    listed = json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)
    assert [(k["name"], k["revoked"]) for k in listed] == [("ward 3", None)]
    assert plain not in keyfile.read_text()
    assert runner.invoke(app, ["keys", "revoke", listed[0]["id"]]).exit_code == 0
    with pytest.raises(ConfigError):
        needs_key("0.0.0.0", s)  # the only key is revoked
    assert runner.invoke(app, ["keys", "revoke", "nope"]).exit_code == 2


def test_401_before_the_body_is_read(api_settings: Settings, lens: MedLens) -> None:
    """Without a key the answer is 401 before one byte of a 60 MiB upload is read (FastAPI
    parses a form before the route's dependencies run, so the key is checked earlier)."""
    plain, _ = KeyStore(api_settings.api_keys_file).create("body test")
    app = create_app(api_settings, lens=lens, require_key=True)
    boundary = "medlensboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"'
        "\r\nContent-Type: image/png\r\n\r\n"
    ).encode()
    pulled = {"bytes": 0}

    async def upload(mib: int):
        tail = f"\r\n--{boundary}--\r\n".encode()
        for chunk in [head, *(b"\0" * 2**20 for _ in range(mib)), tail]:
            pulled["bytes"] += len(chunk)
            yield chunk

    async def post(mib: int, headers: dict[str, str]) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # pulls the body only when the app reads
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            ctype = f"multipart/form-data; boundary={boundary}"
            return await ac.post(
                "/v1/analyze", content=upload(mib), headers={"content-type": ctype, **headers}
            )

    r = asyncio.run(post(60, {}))
    _is_problem(r, 401)
    assert r.headers["WWW-Authenticate"] == "Bearer" and r.headers["X-Request-ID"]
    assert pulled["bytes"] == 0, f"{pulled['bytes']} bytes read before the 401"
    pulled["bytes"] = 0
    r = asyncio.run(post(60, {"Authorization": "Bearer mlk_x_y"}))
    _is_problem(r, 401)
    assert pulled["bytes"] == 0
    # With a valid key the body is read as usual (the model is not loaded here: 503).
    r = asyncio.run(post(1, {"Authorization": f"Bearer {plain}"}))
    assert r.status_code != 401 and pulled["bytes"] > 2**20


def test_docs_schema_and_info_follow_the_key_rule(api_settings: Settings, lens: MedLens) -> None:
    plain, _ = KeyStore(api_settings.api_keys_file).create("docs test")
    auth = {"Authorization": f"Bearer {plain}"}
    with _client(api_settings, lens, require_key=True) as c:
        for path in ("/healthz", "/readyz"):  # liveness and readiness stay open
            assert c.get(path).status_code == 200
        for path in ("/v1/info", "/docs", "/openapi.json"):
            _is_problem(c.get(path), 401)
            assert c.get(path, headers=auth).status_code == 200, path
        assert c.get("/redoc", headers=auth).status_code == 404  # ReDoc needs a CDN


def test_docs_load_nothing_from_other_hosts(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)\s*[=:]\s*["']([^"']+)["']""", page.text)
    urls += re.findall(r"""url\s*:\s*["']([^"']+)["']""", page.text)
    assert "/openapi.json" in urls, page.text
    assert not re.search(r"(?:https?:)?//[a-z0-9.-]+", " ".join(urls)), urls
    for url in urls:  # every asset the page names is served here
        assert client.get(url).status_code == 200, url
    _is_problem(client.get("/docs/assets/index.html"), 404)


def test_docs_without_the_swagger_bundle_are_a_static_page(
    api_settings: Settings, lens: MedLens, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medlens.api import docs

    monkeypatch.setattr(docs, "swagger_ui_dir", lambda: None)
    page = TestClient(create_app(api_settings, lens=lens)).get("/docs")
    assert page.status_code == 200 and "<script" not in page.text
    assert "/v1/analyze" in page.text and "href='/openapi.json'" in page.text


def test_thumbnail_url_ignores_the_host_header(
    api_settings: Settings, lens: MedLens, cases: SampleCases, data_dir: Path
) -> None:
    query = data_dir / ISIC
    forged = {"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    public = replace(api_settings, public_url="https://medlens.example.org/api")
    for settings_, base in ((api_settings, "http://127.0.0.1:8000"), (public, public.public_url)):
        with _client(settings_, lens, case_search=cases) as c:
            r = c.post(
                "/v1/search", files={"image": (query.name, query.read_bytes())}, headers=forged
            )
            assert r.status_code == 200, r.text
            assert "evil.example" not in r.text
            urls = [h["thumbnail_url"] for h in r.json()["results"]]
            assert urls and all(u.startswith(f"{base}/v1/cases/") for u in urls), urls
            r = c.get(f"/v1/cases/{cases.ids[0]}", headers=forged)
            assert r.json()["thumbnail_url"].startswith(base + "/v1/cases/")


def test_corrupt_key_file_is_503_without_paths(tmp_path: Path, lens: MedLens) -> None:
    s = Settings(home=tmp_path / "home", api_timeout_s=600)
    s.home.mkdir()
    s.api_keys_file.write_text('{"keys": [{"id": "abc"')  # cut short
    with _client(s, lens, require_key=True) as c:
        _is_problem(c.get("/v1/findings"), 401)  # no key: nothing to look up
        for headers in ({"Authorization": "Bearer mlk_abc_secret"}, {"X-API-Key": "mlk_a_b"}):
            r = c.get("/v1/findings", headers=headers)
            body = _is_problem(r, 503)
            assert str(tmp_path) not in r.text and "api_keys" not in r.text, r.text
            assert body["request_id"] == r.headers["X-Request-ID"]
            assert int(r.headers["Retry-After"]) > 0


def test_unhandled_error_is_500_problem_with_request_id(
    api_settings: Settings, lens: MedLens, cases: SampleCases, caplog: pytest.LogCaptureFixture
) -> None:
    """A corrupt case library (its vectors no longer match the encoder) fails for real."""
    import copy

    broken = copy.copy(cases)
    broken.emb = np.zeros((3, 7), dtype=np.float32)
    with _client(api_settings, lens, case_search=broken) as c, caplog.at_level("ERROR"):
        r = c.post("/v1/search", files={"text": (None, "melanoma")})
        body = _is_problem(r, 500, "internal-error")
    rid = r.headers["X-Request-ID"]
    assert rid and body["request_id"] == rid and "Traceback" not in r.text
    assert any(rid in rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR")


def test_timed_out_job_is_logged_with_its_request_id(
    api_settings: Settings, lens: MedLens, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    instant = replace(api_settings, api_timeout_s=0)
    path = data_dir / ISIC
    with _client(instant, lens) as c, caplog.at_level("WARNING", logger="medlens.api"):
        r = _post_image(c, path, symptoms="bleeding mole")
        _is_problem(r, 504, "timed-out")
    rid = r.headers["X-Request-ID"]
    lines = [rec.getMessage() for rec in caplog.records if "timed out" in rec.getMessage()]
    assert len(lines) == 1 and rid in lines[0], lines
    assert path.name not in lines[0] and "bleeding" not in lines[0]


# -- 503: model unavailable, overload, no case library -----------------------------------
def test_503_model_unavailable(api_settings: Settings, data_dir: Path, tmp_path: Path) -> None:
    broken = MedLens(model=f"lite:{tmp_path / 'missing_heads.safetensors'}", settings=api_settings)
    with _client(api_settings, broken) as c:
        assert c.get("/healthz").status_code == 200
        body = _is_problem(c.get("/readyz"), 503)
        assert "missing_heads" in body["detail"] or "Unavailable" in body["detail"]
        r = _post_image(c, data_dir / ISIC)
        _is_problem(r, 503)
        assert int(r.headers["Retry-After"]) > 0


def test_503_overload_with_retry_after(
    api_settings: Settings, lens: MedLens, data_dir: Path
) -> None:
    tight = replace(api_settings, api_workers=1, api_queue=0)
    app = create_app(tight, lens=lens)
    payload = (data_dir / CXR).read_bytes()

    async def burst() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            svc = app.state.service
            while not svc.ready:
                await asyncio.sleep(0.05)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
                return await asyncio.gather(
                    *[ac.post("/v1/analyze", files={"image": ("c.png", payload)}) for _ in range(8)]
                )

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    refused = [r for r in responses if r.status_code == 503]
    body = _is_problem(refused[0], 503, "overloaded")
    assert "busy" in body["detail"] and int(refused[0].headers["Retry-After"]) >= 1


def test_pool_bounds_and_timeout() -> None:
    pool = WorkerPool(1, 1)

    async def scenario() -> None:
        slow = [pool.submit(time.sleep, 0.3), pool.submit(time.sleep, 0.3)]
        with pytest.raises(Overloaded):
            pool.submit(time.sleep, 0.0)
        for f in slow:
            f.result()
        with pytest.raises(JobTimeout):
            await pool.run(time.sleep, 0.5, timeout_s=0.05)
        await asyncio.sleep(0.6)
        assert pool.in_use == 0
        assert await pool.run(sum, [1, 2], timeout_s=5) == 3

    asyncio.run(scenario())
    pool.shutdown()


def test_503_without_case_library(client: TestClient, data_dir: Path) -> None:
    r = client.post("/v1/search", files={"image": ("a.jpg", (data_dir / ISIC).read_bytes())})
    assert "no case library" in _is_problem(r, 503, "no-case-library")["detail"]
    _is_problem(client.get("/v1/cases/ISIC_0034524"), 503, "no-case-library")


def test_search_and_cases_with_a_library(
    api_settings: Settings, lens: MedLens, cases: SampleCases, data_dir: Path
) -> None:
    assert isinstance(cases, CaseSearch)
    with _client(api_settings, lens, case_search=cases) as c:
        assert c.get("/v1/info").json()["capabilities"]["search"] is True
        query = data_dir / "isic2018-task3-test/images/ISIC_0034525.jpg"
        r = c.post("/v1/search", files={"image": (query.name, query.read_bytes())})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["query"]["kind"] == "image" and body["library"]["version"] == cases.version
        hits = body["results"]
        assert hits[0]["id"] == "ISIC_0034525" and hits[0]["score"] > 0.99  # itself
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        r = c.post("/v1/search", data={"text": "melanoma", "k": "3"}, files={})
        assert r.status_code == 415  # the search form must be multipart, like analyze
        r = c.post("/v1/search", files={"text": (None, "melanoma"), "k": (None, "3")})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        case = c.get(f"/v1/cases/{hits[1]['id']}").json()
        assert case["label"] == cases.cases[hits[1]["id"]]["label"]
        assert hits[1]["thumbnail_url"].startswith("http://127.0.0.1:8000/v1/cases/")
        thumb = c.get(hits[1]["thumbnail_url"])
        assert thumb.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(thumb.content)).size[0] <= 96
        _is_problem(c.get("/v1/cases/nope"), 404)
        _is_problem(c.post("/v1/search", files={"k": (None, "3")}), 422)
        # An audited analysis records the case-library version.
        r = _post_image(c, query)
        rec = AuditLog.from_settings(api_settings).get(r.headers["X-Request-ID"])
        assert rec.case_library_version == cases.version


def test_analyze_and_search_use_the_library_of_the_app_settings(
    api_settings: Settings, lens: MedLens, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``create_app(Settings(library=...))`` answers /v1/search *and* the similar cases of
    /v1/analyze from that library, whatever MEDLENS_LIBRARY says."""
    from medlens import retrieval
    from medlens.analysis.result import Analysis
    from medlens.datasets import load_dataset
    from medlens.retrieval.library import ingest, subset

    isic = subset(load_dataset("isic2018"), 8)
    assert ingest(isic, lens.encoder, "t_app", workers=0).indexed == len(isic.records)
    monkeypatch.setenv("MEDLENS_LIBRARY", "t_env")  # the environment names another library
    fp = lens.encoder.fingerprint
    assert not retrieval.has_library(fp) and retrieval.has_library(fp, library="t_app")
    app_settings = replace(api_settings, library="t_app")
    with _client(app_settings) as c:  # the app builds its own MedLens from its settings
        assert c.app.state.service.lens.settings is app_settings
        query = data_dir / ISIC
        analysis = _post_image(c, query, domain="dermatology")
        assert analysis.status_code == 200, analysis.text
        got = analysis.json()
        form = {"domain": (None, "dermatology"), "k": (None, "5")}
        found = c.post("/v1/search", files={"image": (query.name, query.read_bytes()), **form})
        assert found.status_code == 200, found.text
    emb = lens.encoder.embed_images([lens.decode(query).pixels])[0]
    want = retrieval.similar_cases(emb, "dermatology", fp, k=5, library="t_app")
    assert got["context_note"] is None and len(want) == 5
    assert got["similar_cases"] == want  # the JSON carries the library's rows unchanged
    assert Analysis.model_validate(got).to_dict() == got  # and conforms to its schema
    from medlens.retrieval.library import case_id, record_hash

    opaque = {case_id(record_hash(isic, r), isic.name, str(r.id)) for r in isic.records}
    assert {row["case_id"] for row in want} <= opaque
    assert [h["id"] for h in found.json()["results"]] == [row["point_id"] for row in want]


# -- schemathesis: no 5xx on anything the schema allows -------------------------------------
def test_schemathesis_no_server_errors(
    api_settings: Settings, lens: MedLens, cases: SampleCases
) -> None:
    """Every operation of the OpenAPI schema, with generated inputs, passes every
    schemathesis check: no 5xx, status codes, content types, headers and bodies as the
    schema documents them, negative data rejected, positive data accepted.

    Uses schemathesis's Python API (operation strategies under Hypothesis); its lazy
    pytest fixture loader does not work with pytest 9. A case library is configured so
    that /v1/search and /v1/cases answer for real instead of 503 "no library"."""
    app = create_app(
        api_settings, lens=lens, case_search=cases, load_in_background=False, require_key=True
    )
    plain, _ = KeyStore(api_settings.api_keys_file).create("schemathesis")
    auth = {"Authorization": f"Bearer {plain}"}  # ignored_auth also tries without it
    failures: dict[str, str] = {}
    seen: dict[str, set[int]] = {}
    with TestClient(app):  # runs the lifespan: model warm, pool up
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=auth)
        operations = [r.ok() for r in schema.get_all_operations()]
        assert len(operations) == sum(len(v) for v in app.openapi()["paths"].values())
        for op in operations:

            @given(case=op.as_strategy())
            @settings(
                max_examples=8,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case) -> None:
                # Every check schemathesis has but positive_data_acceptance: the schema
                # cannot say "bytes that are a valid image", so random bytes the schema
                # allows are rightly refused (415/422, documented).
                response = case.call_and_validate(
                    headers=auth, excluded_checks=[positive_data_acceptance]
                )
                seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)

            try:
                check()
            except Exception as exc:  # collect, so one run reports every operation
                failures[f"{op.method.upper()} {op.path}"] = str(exc)[:2000]
    assert not failures, json.dumps(failures, indent=1)
    assert len(seen) == len(operations)
    assert all(code < 500 for codes in seen.values() for code in codes)
    assert 200 in seen["POST /v1/search"] | seen["GET /v1/findings"], seen


# -- medlens demo: starts both, prints URLs, stops cleanly on SIGTERM ------------------------
def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *_children(kid)]
    return out


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status  # a zombie has exited; only its parent's wait is left


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a test's process and everything it started, whatever the test's outcome."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(15)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
def test_demo_starts_and_stops_cleanly(tmp_path: Path) -> None:
    """Readiness is polled over HTTP (not read from the demo's output) with generous
    limits, and the demo's whole process group is stopped even when the test fails."""
    from medlens.api import launch

    code = "from medlens.cli.service import run_demo; run_demo(api_port=None, ui_port=None)"
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "MEDLENS_HOME": str(home)}
    env.pop("MEDLENS_DATA")  # no demo case library to build: start-up and shutdown only
    env["MEDLENS_API_PORT"] = str(launch.free_port())
    env["MEDLENS_UI_PORT"] = str(launch.free_port())
    api_url = f"http://127.0.0.1:{env['MEDLENS_API_PORT']}"
    ui_url = f"http://127.0.0.1:{env['MEDLENS_UI_PORT']}"
    out_file = tmp_path / "demo.out"
    with open(out_file, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        launch.wait_http_ok(f"{api_url}/readyz", proc, 900, "the demo's API")
        launch.wait_http_ok(f"{ui_url}/_stcore/health", proc, 300, "the demo's UI")
        deadline = time.monotonic() + 60  # the banner follows readiness at once
        while "Press Ctrl-C" not in out_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        out = out_file.read_text()
        assert "MedLens is running" in out and f"UI:       {ui_url}" in out, out
        children = _children(proc.pid)
        assert len(children) >= 2, children
        info = httpx.get(f"{api_url}/v1/info", trust_env=False)
        assert info.status_code == 200
        # The server process splits the cores between its model workers.
        from medlens.config import cores

        limits = info.json()["limits"]
        assert limits["workers"] == min(2, cores()), limits
        assert limits["torch_threads"] == max(1, cores() // limits["workers"]), limits
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert all(_gone(pid) for pid in children), children
        for url in (f"{api_url}/healthz", ui_url):
            with pytest.raises(httpx.TransportError):
                httpx.get(url, trust_env=False, timeout=2)
        # The API's own log lines (start-up and one per request) are in logs/api.log.
        api_log = (home / "logs" / "api.log").read_text()
        assert "GET /v1/info 200" in api_log and "rid=" in api_log, api_log[-2000:]
    finally:
        _kill_group(proc)


@pytest.mark.slow
def test_sigterm_to_ui_stops_streamlit(tmp_path: Path) -> None:
    """`medlens ui` runs Streamlit as a child; SIGTERM to it must not orphan Streamlit."""
    from medlens.api import launch

    port = launch.free_port()
    env = {**os.environ, "MEDLENS_API_URL": f"http://127.0.0.1:{launch.free_port()}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medlens.cli", "ui", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        launch.wait_http_ok(f"http://127.0.0.1:{port}/_stcore/health", proc, 300, "the UI")
        children = _children(proc.pid)
        assert children, "medlens ui started no child"
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        deadline = time.monotonic() + 30
        while not all(_gone(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_gone(pid) for pid in children), children
        assert launch.port_is_free("127.0.0.1", port)
    finally:
        _kill_group(proc)
