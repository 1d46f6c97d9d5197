"""Structured reports (issue 16): the Report model, Markdown, FHIR R4B with its check,
the one-page PDF, ``medlens report`` and ``POST /v1/report`` — on real sample images with
the real model, fhir.resources, fpdf2 and pypdf."""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from PIL import Image
from pypdf import PdfReader
from typer.testing import CliRunner

from medlens.analysis.result import Analysis
from medlens.api.app import create_app
from medlens.api.report import negotiate
from medlens.audit import AuditLog
from medlens.cli import app as cli_app
from medlens.config import Settings
from medlens.errors import ConfigError
from medlens.io import DecodedImage
from medlens.knowledge.codes import icd10cm_exists
from medlens.pipeline import MedLens
from medlens.report import build_report, render
from medlens.report.fhir import AIAST, ICD10CM, SNOMED, check_bundle, to_fhir_bundle, to_fhir_json
from medlens.report.markdown import to_markdown
from medlens.report.model import Report
from medlens.report.pdf import to_pdf

SKIN = "isic2018-task3-test/images/ISIC_0034524.jpg"
DICOM = "cxr-samples/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
CXR_PNG = "cxr-samples/00000001_000.png"
# Rendered pages are build artefacts (build/ is git-ignored): a test run never rewrites a
# tracked file. docs/screenshots/report-*.png are copies of them, refreshed by hand.
SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "artifacts"
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Settings:
    return Settings(home=tmp_path_factory.mktemp("report_home"), data=data_dir)


@pytest.fixture(scope="module")
def lens(settings: Settings) -> MedLens:
    return MedLens(settings=settings)


@pytest.fixture(scope="module")
def cases(lens: MedLens, data_dir: Path) -> dict[str, tuple[DecodedImage, Analysis]]:
    out = {}
    for name, rel in (("skin", SKIN), ("chest-xray", DICOM)):
        decoded = lens.decode(data_dir / rel)
        out[name] = (decoded, lens.analyze(decoded))
    return out


# -- the report model ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["skin", "chest-xray"])
def test_report_is_derived_from_the_analysis(name: str, cases: dict) -> None:
    decoded, a = cases[name]
    report = build_report(a)
    # The JSON of the analysis gives the same report as the object.
    assert build_report(a.to_dict()) == report
    top = a.to_dict()["findings"]
    assert [f.id for f in report.findings][: len(top)] == [f["id"] for f in top]
    for f, row in zip(report.findings, top, strict=False):
        assert (f.probability, list(f.icd10), f.snomed, f.risk) == (
            row["probability"], row["icd10"], row["snomed"], row["risk"]
        )  # fmt: skip
    assert {f.id for f in report.findings if f.sets_triage} == set(a.triage.triggered_by)
    assert report.impression.triage_level == a.triage.level
    assert a.triage.reason in report.impression.text
    assert report.recommendation == a.triage.next_step
    assert report.technique.model_fingerprint == a.model.fingerprint
    assert report.technique.calibration == a.model.calibration
    assert report.disclaimer == a.disclaimer
    assert len(report.evidence.passages) == len(a.knowledge)
    assert report.evidence.passages[0].source == a.knowledge[0].source
    assert report.technique.study_uid is None  # UIDs are identifiers: never in the context
    # No identifiers: the DICOM's patient name and id appear nowhere in any rendering.
    dumped = json.dumps(report.to_dict()) + to_markdown(report)
    dumped += json.dumps(to_fhir_json(report))
    for value in decoded.identifiers.values.values():
        assert value not in dumped
    if name == "chest-xray":
        assert decoded.identifiers.values  # the sample does carry identifiers
        assert report.technique.modality == "CR" and report.technique.view == "PA"


@pytest.mark.parametrize("name", ["skin", "chest-xray"])
def test_narrative_sentences_come_from_fields(name: str, cases: dict) -> None:
    report = build_report(cases[name][1])
    data = report.to_dict()
    numbers = {f"{f.probability:.0%}" for f in report.findings}
    numbers |= set(re.findall(r"\d+%", report.impression.triage_reason))
    names = {f.name for f in report.findings}
    for s in report.narrative:
        assert s.fields
        for path in s.fields:  # every field a sentence cites exists in the report
            node: Any = data
            for part in path.split("."):
                node = node[part]
        for pct in re.findall(r"\d+%", s.text):
            assert pct in numbers, (pct, s.text)
        for code in re.findall(r"\b[A-Z]\d\d(?:\.[0-9A-Z]+)?\b", s.text):
            assert any(code in f.icd10 for f in report.findings), code
    text = report.narrative_text
    assert all(n in text for n in names)
    # Deterministic: the same analysis gives the same words.
    assert build_report(cases[name][1]).narrative_text == text


def test_low_domain_score_and_quality_warn(lens: MedLens, data_dir: Path, cases: dict) -> None:
    # A skin photograph forced to the chest pack now abstains (tests/test_ood.py); an
    # analysis whose domain score is low (a domain given by the caller) still warns.
    d = cases["skin"][1].to_dict()
    d["domain_detection"] = {"source": "given", "scores": {"dermatology": 0.3, "chest_xray": 0.7}}
    warned = [x for x in build_report(d).limitations if x.startswith("Warning")]
    assert len(warned) == 1 and "out of scope" in warned[0]
    d["domain_detection"]["scores"] = {"dermatology": 0.9, "chest_xray": 0.1}
    d["quality"] = {**d["quality"], "status": "low_quality", "warnings": ["low quality: x"]}
    warned = [x for x in build_report(d).limitations if x.startswith("Warning")]
    assert warned == ["Warning: Low quality: x."]
    own = build_report(cases["skin"][1])
    assert not [x for x in own.limitations if x.startswith("Warning")]


def test_bad_analyses_are_refused(cases: dict) -> None:
    good = cases["skin"][1].to_dict()
    with pytest.raises(ConfigError, match="schema version '0'"):
        build_report({**good, "schema_version": "0"})
    with pytest.raises(ConfigError, match="failed analysis"):
        build_report({"file": "x.png", "error": "CorruptImage: truncated"})
    broken = copy.deepcopy(good)
    broken["findings"][0]["probability"] = "high"
    with pytest.raises(ConfigError, match="findings"):
        build_report(broken)
    with pytest.raises(ConfigError, match="unknown report format 'docx'"):
        render(build_report(good), "docx")


# -- Markdown ------------------------------------------------------------------------------
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"  # a study UID a caller holding identifiers passes


def test_markdown_lists_the_report(cases: dict) -> None:
    assert build_report(cases["chest-xray"][1]).technique.study_uid is None  # never implied
    report = build_report(cases["chest-xray"][1], study_uid=STUDY_UID)
    md = to_markdown(report)
    for heading in ("Indication", "Technique", "Findings", "Impression", "Recommendation",
                    "Evidence", "Limitations"):  # fmt: skip
        assert f"## {heading}\n" in md
    rows = [line for line in md.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(rows) == len(report.findings)
    assert report.findings[0].name in rows[0] and f"{report.findings[0].probability:.1%}" in rows[0]
    assert report.disclaimer in md and report.technique.study_uid in md


# -- FHIR R4B ------------------------------------------------------------------------------
def _resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


@pytest.mark.parametrize("name", ["skin", "chest-xray"])
def test_fhir_bundle_parses_and_passes_the_check(name: str, cases: dict) -> None:
    report = build_report(cases[name][1], study_uid=STUDY_UID if name == "chest-xray" else None)
    text = to_fhir_bundle(report).model_dump_json(exclude_none=True)
    parsed = Bundle.model_validate_json(text)  # R4B parses it back
    assert check_bundle(parsed) == []
    data = json.loads(text)
    assert check_bundle(data) == []
    (dr,) = _resources(data, "DiagnosticReport")
    assert dr["status"] == "preliminary"
    observations = _resources(data, "Observation")
    assert len(observations) == len(report.findings) == len(dr["result"])
    for obs, f in zip(observations, report.findings, strict=True):
        codings = obs["code"]["coding"]
        snomed = {"system": SNOMED, "code": f.snomed, "display": f.name}
        assert (snomed in codings) == bool(f.snomed)
        assert all(c["code"] for c in codings)  # never an empty code
        assert [c["code"] for c in codings if c["system"] == ICD10CM] == list(f.icd10)
        assert obs["valueQuantity"]["value"] == f.probability
        assert ("coding" in obs["interpretation"][0]) == (f.sets_triage and f.risk != "routine")
    (device,) = _resources(data, "Device")
    assert device["version"][0]["value"] == report.technique.model_fingerprint
    (prov,) = _resources(data, "Provenance")
    assert prov["agent"][0]["who"]["reference"].endswith(device["id"])
    for e in data["entry"]:
        assert AIAST["code"] in [s["code"] for s in e["resource"]["meta"]["security"]]
    assert not _resources(data, "Patient") and '"subject"' not in text
    md = base64.b64decode(dr["presentedForm"][0]["data"]).decode()
    assert md == to_markdown(report)
    if name == "chest-xray":
        uid = report.technique.study_uid
        assert dr["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{uid}"
    else:
        assert "imagingStudy" not in dr


def test_broken_bundles_fail_the_check(cases: dict) -> None:
    good = to_fhir_json(build_report(cases["chest-xray"][1]))
    assert check_bundle(good) == []

    dangling = copy.deepcopy(good)
    _resources(dangling, "DiagnosticReport")[0]["result"][0]["reference"] = "urn:uuid:nowhere"
    assert any("urn:uuid:nowhere does not resolve" in p for p in check_bundle(dangling))

    bad_system = copy.deepcopy(good)
    _resources(bad_system, "Observation")[0]["code"]["coding"][0]["system"] = "http://snomed.org"
    problems = check_bundle(bad_system)
    assert any("unknown code system 'http://snomed.org'" in p for p in problems)
    no_code = copy.deepcopy(good)
    _resources(no_code, "Observation")[0]["code"]["coding"][0]["code"] = ""
    assert any("a coding without a code" in p for p in check_bundle(no_code))
    no_icd = copy.deepcopy(good)
    obs = _resources(no_icd, "Observation")[0]
    obs["code"]["coding"] = [c for c in obs["code"]["coding"] if c["system"] != ICD10CM]
    assert any("needs an ICD-10-CM coding" in p for p in check_bundle(no_icd))

    assert not icd10cm_exists("J93.7")
    bad_icd = copy.deepcopy(good)
    coding = _resources(bad_icd, "Observation")[1]["code"]["coding"]
    next(c for c in coding if c["system"] == ICD10CM)["code"] = "J93.7"
    assert any("ICD-10-CM code 'J93.7' does not exist" in p for p in check_bundle(bad_icd))

    unmarked = copy.deepcopy(good)
    _resources(unmarked, "Device")[0]["meta"]["security"] = []
    assert any("lacks AIAST" in p for p in check_bundle(unmarked))

    with_patient = copy.deepcopy(good)
    with_patient["entry"].append(
        {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "id": "p"}}
    )
    _resources(with_patient, "Observation")[0]["subject"] = {"reference": "urn:uuid:p"}
    problems = check_bundle(with_patient)
    assert any("holds a Patient" in p for p in problems)
    assert any(".subject: reports carry no patient reference" in p for p in problems)

    final = copy.deepcopy(good)
    _resources(final, "DiagnosticReport")[0]["status"] = "final"
    assert any("must be preliminary" in p for p in check_bundle(final))

    not_fhir = copy.deepcopy(good)
    _resources(not_fhir, "Observation")[0]["valueQuantity"]["value"] = "high"
    assert any("does not parse" in p for p in check_bundle(not_fhir))


# -- PDF -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["skin", "chest-xray"])
def test_pdf_has_image_table_and_disclaimer(name: str, cases: dict) -> None:
    decoded, a = cases[name]
    report = build_report(a)
    pdf = to_pdf(report, decoded)
    reader = PdfReader(io.BytesIO(pdf))
    assert len(reader.pages) == 1
    page = reader.pages[0]
    assert len(page.images) == 1  # the thumbnail of the analysed image
    words = " ".join(page.extract_text().split())
    for f in report.findings:
        assert f"{f.probability:.1%}" in words and f.snomed in words
    assert report.findings[0].name.split(" (")[0] in words
    assert f"Triage: {report.impression.triage_level.upper()}" in words
    assert " ".join(report.disclaimer.split()) in words


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="pdftoppm (poppler-utils) missing")
@pytest.mark.parametrize("name", ["skin", "chest-xray"])
def test_pdf_page_as_png(name: str, cases: dict, tmp_path: Path) -> None:
    """The artefact a person looks at: build/artifacts/report-<name>.png."""
    decoded, a = cases[name]
    src = tmp_path / f"report-{name}.pdf"
    src.write_bytes(to_pdf(build_report(a), decoded))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    stem = SCREENSHOTS / f"report-{name}"
    subprocess.run(
        ["pdftoppm", "-png", "-r", "80", "-singlefile", str(src), str(stem)],
        check=True,
        capture_output=True,
    )
    png = Image.open(f"{stem}.png").convert("RGB")
    assert png.width > 500 and png.height > 700
    # The thumbnail region (top left) is the image, not blank paper.
    top_left = png.crop((int(png.width * 0.06), int(png.height * 0.1),
                         int(png.width * 0.3), int(png.height * 0.25)))  # fmt: skip
    assert len(top_left.getcolors(maxcolors=1 << 20) or []) > 50


# -- medlens report ------------------------------------------------------------------------
runner = CliRunner()


def test_cli_report_fhir_and_pdf(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.fhir.json"
    res = runner.invoke(cli_app, ["report", str(data_dir / DICOM), "--format", "fhir",
                                  "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert check_bundle(json.loads(out.read_text())) == []
    pdf = tmp_path / "r.pdf"
    args = ["report", str(data_dir / SKIN), "-f", "pdf", "--out", str(pdf)]
    res = runner.invoke(cli_app, [*args, "--domain", "dermatology", "--symptoms", "itchy, bleeds"])
    assert res.exit_code == 0, res.output
    text = PdfReader(pdf).pages[0].extract_text()
    assert "symptom text was supplied" in " ".join(text.split())
    assert "itchy" not in text


def test_cli_report_markdown_to_stdout(data_dir: Path) -> None:
    res = runner.invoke(cli_app, ["report", str(data_dir / CXR_PNG), "--top-k", "3"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("# MedLens report — Chest X-ray")
    assert len(re.findall(r"^\| \d+ \|", res.stdout, flags=re.M)) >= 3


def test_cli_report_folder(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(data_dir / SKIN, folder / "lesion.jpg")
    shutil.copy(data_dir / CXR_PNG, folder / "sub" / "chest.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    res = runner.invoke(cli_app, ["report", str(folder), "--out", str(out)])
    assert res.exit_code == 0, res.output
    for stem in ("lesion", "sub/chest"):
        assert len(PdfReader(out / f"{stem}.pdf").pages) == 1
        assert check_bundle(json.loads((out / f"{stem}.fhir.json").read_text())) == []
    assert not (out / "broken.pdf").exists()
    import csv

    with open(out / "summary.csv") as fh:
        rows = {r["file"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"broken.png", "lesion.jpg", "sub/chest.png"}
    assert rows["broken.png"]["error"] and not rows["lesion.jpg"]["error"]
    assert rows["sub/chest.png"]["domain"] == "chest_xray"
    assert "2 reports (1 failed)" in " ".join(res.output.split())


def test_cli_report_bad_format_is_one_line_and_exit_2(data_dir: Path, tmp_path: Path) -> None:
    res = runner.invoke(cli_app, ["report", str(data_dir / SKIN), "--format", "docx"])
    assert res.exit_code == 2
    assert "unknown report format 'docx'" in res.output and "md, pdf, fhir" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(cli_app, ["report", str(tmp_path / "nope.png")])
    assert res.exit_code == 2 and "does not exist" in res.output


# -- POST /v1/report -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(settings: Settings, lens: MedLens) -> TestClient:
    app = create_app(settings, lens=lens, load_in_background=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _post(c: TestClient, path: Path, accept: str | None, **data: Any) -> Any:
    headers = {"Accept": accept} if accept is not None else {}
    files = {"image": (path.name, path.read_bytes())}
    return c.post("/v1/report", files=files, data=data, headers=headers)


def test_negotiate() -> None:
    assert negotiate(None) == negotiate("*/*") == "text/markdown"
    assert negotiate("application/pdf;q=0.5, application/fhir+json") == "application/fhir+json"
    assert negotiate("text/csv, application/pdf;q=0.1") == "application/pdf"
    assert negotiate("application/pdf;q=0") is None
    assert negotiate("text/csv") is None


def test_api_report_fhir_is_checked_and_audited(
    client: TestClient, settings: Settings, data_dir: Path
) -> None:
    r = _post(client, data_dir / DICOM, "application/fhir+json")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate_json(r.content)
    assert check_bundle(bundle) == []
    assert "16d7f894" not in r.text  # the DICOM's PatientName / PatientID
    rec = AuditLog.from_settings(settings).get(r.headers["X-Audit-ID"])
    assert rec is not None and rec.output["report"]["format"] == "fhir"
    assert rec.output["report"]["sha256"] == hashlib.sha256(r.content).hexdigest()
    assert rec.output["findings"][0]["id"] == rec.top_finding
    assert client.get("/v1/info").json()["capabilities"]["report"] is True


def test_api_report_pdf_markdown_and_json(client: TestClient, data_dir: Path) -> None:
    r = _post(client, data_dir / SKIN, "application/pdf", domain="dermatology")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/pdf" and r.content.startswith(b"%PDF")
    assert len(PdfReader(io.BytesIO(r.content)).pages) == 1
    for accept in (None, "text/markdown"):
        r = _post(client, data_dir / SKIN, accept, top_k="2")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/markdown")
        assert "## Findings" in r.text
    r = _post(client, data_dir / CXR_PNG, "application/json")
    assert r.status_code == 200, r.text
    report = Report.model_validate(r.json())
    assert report.indication.domain == "chest_xray"


def test_api_report_unknown_type_is_406_problem(client: TestClient, data_dir: Path) -> None:
    r = _post(client, data_dir / SKIN, "text/csv")
    assert r.status_code == 406 and r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert "application/fhir+json" in body["detail"] and body["status"] == 406
    empty = {"image": ("x.png", b"")}
    r = client.post("/v1/report", files=empty, headers={"Accept": "text/markdown"})
    assert r.status_code == 400 and r.headers["content-type"].startswith(PROBLEM)


# -- the grounding check -------------------------------------------------------------------
def _other_finding(report: Report, domain: str) -> str:
    from medlens.knowledge import load_domain

    ids = {f.id for f in report.findings}
    return next(f.name for f in load_domain(domain).findings if f.id not in ids)


def _adversarial(report: Report) -> list[tuple[str, str]]:
    """(kind, rewrite) pairs, each a small lie about the report."""
    t = report.narrative_text
    top = report.findings[0]
    pct = f"{top.probability:.0%}"
    bumped = f"{min(top.probability + 0.07, 0.99):.0%}"
    codes = {c for f in report.findings for c in f.icd10}
    fake_icd = next(c for c in ("J18.9", "C43.9", "L40.0", "I21.9") if c not in codes)
    level = report.impression.triage_level
    other_level = next(lv for lv in ("routine", "urgent", "soon") if lv != level)
    other_domain = "chest_xray" if report.indication.domain == "dermatology" else "dermatology"
    first_code = report.findings[0].icd10[0]
    same, other = (_other_finding(report, d) for d in (report.indication.domain, other_domain))
    return [
        ("swapped finding", t.replace(top.name, same)),
        ("swapped finding, other domain", t.replace(top.name, other)),
        ("added finding", t + f" {same} is also seen."),
        ("changed probability", t.replace(pct, bumped)),
        ("changed probability, one place", t.replace(pct, bumped, 1)),
        ("probability as a decimal", t + f" The top score is {top.probability + 0.03:.2f}."),
        ("invented number", t + " The lesion measures 14 mm."),
        ("invented ICD-10-CM code", t + f" Code {fake_icd}."),
        ("replaced ICD-10-CM code", t.replace(first_code, fake_icd)),
        ("invented SNOMED CT id", t + " SNOMED CT 22298006."),
        ("wrong side", t + " The abnormality is on the left."),
        ("right-sided", t.replace(top.name, f"right-sided {top.name}", 1)),
        ("bilateral", t + " Changes are bilateral."),
        ("swapped triage", t.replace(f"Triage: {level}", f"Triage: {other_level}")),
        ("triage level dropped", " ".join(s.text for s in report.narrative[:3])),
        ("impression finding dropped", f"Triage: {level}. Nothing else of note."),
    ]


def test_grounding_rejects_adversarial_rewrites_and_accepts_the_template(cases: dict) -> None:
    from medlens.report.grounding import check_grounding, grounded_narrative

    rewrites = []
    for name in ("skin", "chest-xray"):
        report = build_report(cases[name][1])
        assert check_grounding(report.narrative_text, report) == []
        g = grounded_narrative(report, report.narrative_text)
        assert g.source == "rewrite" and not g.rejected_because
        # A faithful paraphrase built from the fields passes too.
        named = [f for f in report.findings if f.id in report.impression.top_findings]
        paraphrase = (
            f"The most likely finding is {named[0].name.lower()} at {named[0].probability:.0%}. "
            + " ".join(f"{f.name} scored {f.probability:.1%}." for f in named[1:])
            + f" Triage is {report.impression.triage_level}."
        )
        assert check_grounding(paraphrase, report) == [], paraphrase
        for kind, text in _adversarial(report):
            assert text != report.narrative_text, kind
            rewrites.append((name, kind, report, text))
    assert len(rewrites) >= 30
    for name, kind, report, text in rewrites:
        problems = check_grounding(text, report)
        assert problems, f"{name}: {kind} accepted: {text}"
        g = grounded_narrative(report, text)
        assert g.source == "template" and g.text == report.narrative_text
        assert list(g.rejected_because) == problems
    assert grounded_narrative(report, None).source == "template"


# -- the language-model rewrite: a real local HTTP endpoint --------------------------------
@pytest.fixture(scope="module")
def llm_url() -> Any:
    """An OpenAI-compatible endpoint on loopback. Path prefixes choose its behaviour:
    /echo returns the text it was sent, /lie adds a side, /slow answers after 3 s,
    /error answers 500, /garbage answers non-JSON."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            sent = json.loads(self.rfile.read(length))["messages"][-1]["content"]
            mode = self.path.split("/")[1]
            if mode == "slow":
                time.sleep(3)
            if mode == "error":
                self.send_response(500)
                self.end_headers()
                return
            text = sent + (" The opacity is in the left lower zone." if mode == "lie" else "")
            raw = (
                b"<html>"
                if mode == "garbage"
                else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": text}}]}
                ).encode()
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_llm_rewrite_is_guarded(cases: dict, llm_url: str) -> None:
    from medlens.api.launch import free_port
    from medlens.report.llm import rewrite_narrative

    report = build_report(cases["chest-xray"][1])
    template = report.narrative_text
    ok = rewrite_narrative(report, f"{llm_url}/echo")
    assert ok.source == "rewrite" and ok.text == template and not ok.rejected_because
    lie = rewrite_narrative(report, f"{llm_url}/lie")
    assert lie.source == "template" and lie.text == template
    assert lie.rejected_because == ("states a laterality the report does not: left",)
    slow = rewrite_narrative(report, f"{llm_url}/slow", timeout_s=0.5)
    assert slow.source == "template" and "timed out" in slow.rejected_because[0]
    for path, why in (("error", "unavailable"), ("garbage", "not understood")):
        g = rewrite_narrative(report, f"{llm_url}/{path}")
        assert g.source == "template" and why in g.rejected_because[0], g
    down = rewrite_narrative(report, f"http://127.0.0.1:{free_port()}", timeout_s=2)
    assert down.source == "template" and "unavailable" in down.rejected_because[0]
