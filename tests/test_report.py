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

import numpy as np
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
    # Similar past reports (IU X-ray under MEDLENS_DATA), with their source ids.
    assert "Reports of similar studies" in res.stdout
    assert len(re.findall(r"^- iu_xray CXR\d+ \(similarity", res.stdout, flags=re.M)) == 3


def test_cli_report_uses_medlens_llm_url(data_dir: Path, llm_url: str) -> None:
    env = {"MEDLENS_LLM_URL": f"{llm_url}/lie", "MEDLENS_LLM_TIMEOUT_S": "5"}
    res = runner.invoke(cli_app, ["report", str(data_dir / CXR_PNG)], env=env)
    assert res.exit_code == 0, res.output
    note = "Template narrative shown: the language-model rewrite was not used"
    assert note in " ".join(res.output.split()) and note in res.stdout
    assert "left lower zone" not in res.stdout


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
    /echo returns the text it was sent, /lie adds a side, /swap/A/B replaces A by B,
    /slow answers after 3 s, /trickle sends its answer a byte every 0.5 s (20 s in all),
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
            from urllib.parse import unquote

            parts = self.path.split("/")
            mode = parts[1]
            if mode == "slow":
                time.sleep(3)
            if mode == "trickle":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "40")
                self.end_headers()
                try:
                    for _ in range(40):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.5)
                except OSError:  # the client gave up: that is the point
                    pass
                return
            if mode == "swap":
                sent = sent.replace(unquote(parts[2]), unquote(parts[3]))
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


# -- issue 16, remaining items -------------------------------------------------------------
# Similar past reports run on a slice of the real IU X-ray reports (the first rows of
# reports.csv), so a cold test embeds ~150 texts instead of 3,955.
IU_ROWS = 150


@pytest.fixture(scope="module")
def iu_settings(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Settings:
    import csv

    root = tmp_path_factory.mktemp("iu_data")
    (root / "iu-xray-reports").mkdir()
    with open(data_dir / "iu-xray-reports" / "reports.csv", newline="") as src:
        rows = list(csv.reader(src))
    with open(root / "iu-xray-reports" / "reports.csv", "w", newline="") as dst:
        csv.writer(dst).writerows(rows[: IU_ROWS + 1])
    return Settings(home=tmp_path_factory.mktemp("iu_home"), data=root)


def _iu_root(s: Settings) -> Path:
    assert s.data is not None
    return s.data / "iu-xray-reports"


def test_positive_text_and_draft_query() -> None:
    from medlens.retrieval.reports import NORMAL_TEXT, draft_query, positive_text

    text = (
        "The heart is normal in size. There is no pneumothorax. Stable calcified granuloma "
        "in the right upper lobe. Small XXXX effusion on the left."
    )
    assert positive_text(text) == (
        "Stable calcified granuloma in the right upper lobe. Small   effusion on the left."
    )
    assert positive_text("No acute disease. Lungs are clear.") == NORMAL_TEXT
    q = draft_query(["pleural_effusion", "no_such_finding"])
    assert q.startswith("Pleural effusion.") and "%" not in q
    assert draft_query(["no_finding"]) == NORMAL_TEXT
    assert draft_query([]) == ""


def test_report_index_is_cached_by_content_and_encoder(iu_settings: Settings) -> None:
    from medlens.embeddings import open_store
    from medlens.retrieval import reports as R

    class Counting(R.FrozenMiniLM):
        calls = 0

        def embed_texts(self, texts: Any, batch_size: int = R.BATCH) -> Any:
            Counting.calls += len(texts)
            return super().embed_texts(texts, batch_size)

    root = _iu_root(iu_settings)
    store = open_store(iu_settings.cache_dir)
    enc = Counting()
    index = R.load_report_index(root, store=store, encoder=enc)
    assert 100 < len(index) <= IU_ROWS and index.vectors.shape == (len(index), 384)
    assert Counting.calls > 0
    assert R.load_report_index(root, store=store, encoder=enc) is index  # in-process memo
    R._memo.clear()  # a new process: every report vector comes back from the cache
    before = Counting.calls
    again = R.load_report_index(root, store=store, encoder=enc)
    assert Counting.calls == before
    assert np.array_equal(again.vectors, index.vectors)
    assert np.allclose(np.linalg.norm(index.vectors, axis=1), 1, atol=1e-4)
    # Its own text finds a report first.
    i = next(i for i, imp in enumerate(index.impressions) if imp and "effusion" in imp.lower())
    own = R.positive_text(R.report_text(index.impressions[i], index.findings[i]))
    hits = index.nearest(own, k=3, store=store)
    assert hits[0].source_id == index.ids[i] and hits[0].similarity > 0.99
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)
    assert index.ids[i] not in [h.source_id for h in index.nearest(own, 3, exclude=[index.ids[i]])]
    # No text of any report reaches the cache file: only hashes and vectors.
    raw = (iu_settings.cache_dir / "embeddings.sqlite3").read_bytes()
    assert index.impressions[i].encode()[:40] not in raw


def test_chest_report_shows_similar_past_reports(cases: dict, iu_settings: Settings) -> None:
    from medlens.report.compose import compose_report

    decoded, a = cases["chest-xray"]
    report = compose_report(a, settings=iu_settings)
    found = report.evidence.similar_reports
    assert len(found) == 3 and report.evidence.similar_reports_note is None
    ids = {f"CXR{r.split(',')[0]}" for r in
           (_iu_root(iu_settings) / "reports.csv").read_text().splitlines()[1:]}  # fmt: skip
    assert all(r.source_id in ids and r.dataset == "iu_xray" for r in found)
    md = to_markdown(report)
    assert "Reports of similar studies" in md
    assert all(r.source_id in md for r in found)
    assert check_bundle(to_fhir_json(report)) == []
    words = " ".join(PdfReader(io.BytesIO(to_pdf(report, decoded))).pages[0].extract_text().split())
    assert "Reports of similar studies" in words and found[0].source_id in words
    assert report.narrative_shown == report.narrative_text and report.rewrite is None
    # The JSON of such a report parses back to the same report.
    assert Report.model_validate_json(report.model_dump_json()) == report
    # Skin reports have none and say nothing; no IU folder: a note says why.
    skin = compose_report(cases["skin"][1], settings=iu_settings)
    assert skin.evidence.similar_reports == () and skin.evidence.similar_reports_note is None
    bare = Settings(home=iu_settings.home, data=iu_settings.home)
    none = compose_report(a, settings=bare)
    assert none.evidence.similar_reports == ()
    assert "iu-xray-reports" in (none.evidence.similar_reports_note or "")


def test_similar_reports_do_not_wait_for_a_first_build(
    cases: dict, iu_settings: Settings, tmp_path: Path
) -> None:
    """The API never waits for the first embedding of the reports: it starts it and says so."""
    import dataclasses
    import time

    from medlens.report import compose

    fresh = tmp_path / "data" / "iu-xray-reports"
    fresh.mkdir(parents=True)
    rows = (_iu_root(iu_settings) / "reports.csv").read_text().splitlines(keepends=True)
    (fresh / "reports.csv").write_text("".join(rows[:60]))  # other content: not memoised
    s = dataclasses.replace(iu_settings, data=tmp_path / "data")
    first = compose.compose_report(cases["chest-xray"][1], settings=s, wait_for_index=False)
    assert first.evidence.similar_reports == ()
    assert "being indexed" in (first.evidence.similar_reports_note or "")
    compose._building[str(fresh)].join(timeout=600)
    later = compose.compose_report(cases["chest-xray"][1], settings=s, wait_for_index=False)
    assert len(later.evidence.similar_reports) == 3
    assert time.monotonic()  # (no wall-clock assertion: the machine may be loaded)


# -- MEDLENS_LLM_URL: the narrative rewrite in report generation ---------------------------
def _llm_settings(base: Settings, url: str, timeout_s: float = 5.0) -> Settings:
    import dataclasses

    return dataclasses.replace(base, llm_url=url, llm_timeout_s=timeout_s)


def test_llm_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDLENS_LLM_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("MEDLENS_LLM_TIMEOUT_S", "7")
    s = Settings()
    assert (s.llm_url, s.llm_timeout_s, s.llm_model) == ("http://127.0.0.1:9/v1", 7, "default")
    monkeypatch.setenv("MEDLENS_LLM_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match="MEDLENS_LLM_TIMEOUT_S"):
        Settings()
    monkeypatch.delenv("MEDLENS_LLM_URL")
    monkeypatch.delenv("MEDLENS_LLM_TIMEOUT_S")
    assert Settings().llm_url is None


def test_report_narrative_rewritten_when_grounded(
    cases: dict, settings: Settings, llm_url: str
) -> None:
    import time
    from urllib.parse import quote

    from medlens.knowledge import load_domain
    from medlens.report.compose import compose_report

    a = cases["chest-xray"][1]
    template = build_report(a).narrative_text

    # (a) a faithful rewrite: shown, with a note that it was checked
    ok = compose_report(a, settings=_llm_settings(settings, f"{llm_url}/echo"))
    assert ok.rewrite is not None and ok.rewrite.accepted and ok.narrative_shown == template
    md = to_markdown(ok)
    assert "rewritten for readability by a language model and checked" in md
    assert check_bundle(to_fhir_json(ok)) == []

    # (b) a rewrite that swaps the top finding for another: refused, template + note
    top = ok.findings[0].name
    other = next(f.name for f in load_domain("chest_xray").findings
                 if f.id not in {x.id for x in ok.findings})  # fmt: skip
    swap = f"{llm_url}/swap/{quote(top, safe='')}/{quote(other, safe='')}"
    bad = compose_report(a, settings=_llm_settings(settings, swap))
    assert bad.rewrite is not None and not bad.rewrite.accepted
    assert bad.narrative_shown == template and other not in to_markdown(bad)
    assert any("names a finding the report does not contain" in r for r in bad.rewrite.reasons)
    assert "Template narrative shown" in to_markdown(bad)
    xhtml = _resources(to_fhir_json(bad), "DiagnosticReport")[0]["text"]["div"]
    assert "Template narrative shown" in xhtml and other not in xhtml

    # (c) an endpoint that sleeps past the time-out: template, and no hang
    t0 = time.monotonic()
    slow = compose_report(a, settings=_llm_settings(settings, f"{llm_url}/slow", 0.5))
    assert time.monotonic() - t0 < 30  # /slow answers after 3 s; generous on a loaded box
    assert slow.rewrite is not None and not slow.rewrite.accepted
    assert "timed out" in slow.rewrite.note and slow.narrative_shown == template

    # nobody listening: template with the reason
    from medlens.api.launch import free_port

    down = compose_report(a, settings=_llm_settings(settings, f"http://127.0.0.1:{free_port()}"))
    assert down.rewrite is not None and "unavailable" in down.rewrite.note


def test_llm_trickling_endpoint_is_cut_at_the_deadline(cases: dict, llm_url: str) -> None:
    """httpx's time-out is per read; the whole call still ends near timeout_s."""
    import time

    from medlens.report.llm import DEADLINE_MARGIN_S, rewrite_narrative

    report = build_report(cases["chest-xray"][1])
    t0 = time.monotonic()
    g = rewrite_narrative(report, f"{llm_url}/trickle", timeout_s=1.0)
    took = time.monotonic() - t0
    assert g.source == "template" and "timed out" in g.rejected_because[0]
    assert took < 1.0 + DEADLINE_MARGIN_S + 5  # the trickle alone lasts 20 s


def test_api_report_uses_llm_and_audits_the_outcome(
    lens: MedLens, iu_settings: Settings, llm_url: str, data_dir: Path, cases: dict
) -> None:
    import dataclasses

    from medlens.report.compose import compose_report

    compose_report(cases["chest-xray"][1], settings=iu_settings)  # the index is built
    s = dataclasses.replace(iu_settings, llm_url=f"{llm_url}/lie", llm_timeout_s=5)
    app = create_app(s, lens=lens, load_in_background=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = _post(c, data_dir / CXR_PNG, "text/markdown")
        assert r.status_code == 200, r.text
        rec = AuditLog.from_settings(s).get(r.headers["X-Audit-ID"])
        sent = rec.output["report"]
        assert sent["sha256"] == hashlib.sha256(r.content).hexdigest()
        assert sent["format"] == "md" and sent["narrative"] == "template"
        assert sent["narrative_rejected_because"] == [
            "states a laterality the report does not: left"
        ]
        assert len(sent["similar_reports"]) == 3
        assert all(i in r.text for i in sent["similar_reports"])
        assert "left lower zone" not in r.text
        # The record is the analysis the report was made from.
        assert (
            rec.output["input"]["content_hash"]
            == hashlib.sha256((data_dir / CXR_PNG).read_bytes()).hexdigest()
        )
        assert rec.output["findings"][0]["id"] == rec.top_finding
        r2 = _post(c, data_dir / CXR_PNG, "application/pdf")
        rec2 = AuditLog.from_settings(s).get(r2.headers["X-Audit-ID"])
        assert rec2.output["report"]["format"] == "pdf"
        assert rec2.output["report"]["sha256"] == hashlib.sha256(r2.content).hexdigest()
        assert rec2.output["input"]["content_hash"] == rec.output["input"]["content_hash"]


# -- explanation overlay as FHIR Media -----------------------------------------------------
def _overlay_png(decoded: DecodedImage) -> bytes:
    """A heatmap PNG over the real image: a red blob blended onto a thumbnail of it."""
    base = Image.fromarray(decoded.pixels.astype(np.uint8)).convert("RGB")
    base.thumbnail((160, 160))
    yy, xx = np.mgrid[0 : base.height, 0 : base.width]
    heat = np.exp(-(((xx - base.width * 0.6) ** 2 + (yy - base.height * 0.4) ** 2) / 900.0))
    rgb = np.asarray(base, dtype=np.float32)
    rgb[..., 0] = np.clip(rgb[..., 0] * (1 - heat) + 255 * heat, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_overlay_is_a_fhir_media_linked_from_the_report(cases: dict) -> None:
    from medlens.report.model import make_overlay

    decoded, a = cases["chest-xray"]
    png = _overlay_png(decoded)
    overlay = make_overlay(png, "Grad-CAM: " + a.findings[0].name, a.findings[0].id)
    report = build_report(a, overlay=overlay)
    assert Report.model_validate_json(report.model_dump_json()) == report  # PNG as base64
    data = json.loads(to_fhir_bundle(report).model_dump_json(exclude_none=True))
    assert check_bundle(data) == []
    (media,) = _resources(data, "Media")
    (dr,) = _resources(data, "DiagnosticReport")
    url = dr["media"][0]["link"]["reference"]
    assert next(e for e in data["entry"] if e["fullUrl"] == url)["resource"] is not None
    assert base64.b64decode(media["content"]["data"]) == png
    assert media["content"]["contentType"] == "image/png"
    assert (media["width"], media["height"]) == (overlay.width, overlay.height)
    assert AIAST["code"] in [s["code"] for s in media["meta"]["security"]]
    (prov,) = _resources(data, "Provenance")
    assert {"reference": url} in prov["target"]
    assert overlay.sha256[:16] in to_markdown(report)
    page = PdfReader(io.BytesIO(to_pdf(report, decoded))).pages[0]
    assert len(page.images) == 2  # the image and its heatmap
    # Without an overlay there is no Media.
    assert not _resources(to_fhir_json(build_report(a)), "Media")

    unlinked = copy.deepcopy(data)
    del _resources(unlinked, "DiagnosticReport")[0]["media"]
    assert any("not linked from DiagnosticReport.media" in p for p in check_bundle(unlinked))
    wrong_hash = copy.deepcopy(data)
    _resources(wrong_hash, "Media")[0]["content"]["hash"] = base64.b64encode(b"x" * 20).decode()
    assert any("hash does not match" in p for p in check_bundle(wrong_hash))
    not_image = copy.deepcopy(data)
    m = _resources(not_image, "Media")[0]["content"]
    m["data"], m["hash"] = base64.b64encode(b"hello").decode(), None
    del m["hash"]
    assert any("not a PNG or JPEG" in p for p in check_bundle(not_image))
    to_obs = copy.deepcopy(data)
    obs_url = _resources(to_obs, "DiagnosticReport")[0]["result"][0]["reference"]
    _resources(to_obs, "DiagnosticReport")[0]["media"][0]["link"]["reference"] = obs_url
    assert any("does not link to a Media" in p for p in check_bundle(to_obs))
    no_device = copy.deepcopy(data)
    del _resources(no_device, "Media")[0]["device"]
    assert any("Media.device.reference is missing" in p for p in check_bundle(no_device))

    with pytest.raises(ConfigError, match="PNG"):
        make_overlay(b"GIF89a....", "x")
    with pytest.raises(ConfigError, match="cannot be read"):
        make_overlay(png[:40], "x")


# -- the UI's report downloads (streamlit AppTest, the real API in-process) ----------------
def _downloads_script() -> None:
    import streamlit as st

    from medlens.ui.downloads import downloads_panel

    downloads_panel(
        st.session_state["client"], st.session_state["result"], st.session_state["image"],
        "chest.png",
    )  # fmt: skip


def test_ui_offers_markdown_pdf_and_fhir_downloads(
    client: TestClient, settings: Settings, data_dir: Path
) -> None:
    from streamlit.testing.v1 import AppTest

    from medlens.ui.client import ApiClient
    from medlens.ui.downloads import FORMATS, STATE_KEY, fetch_report

    api = ApiClient("http://testserver")
    api._http = client  # the FastAPI TestClient is an httpx.Client: the real app, no socket
    image = (data_dir / CXR_PNG).read_bytes()
    result = api.analyze(image, "chest.png", top_k=3)
    at = AppTest.from_function(_downloads_script, default_timeout=600)
    at.session_state["client"] = api
    at.session_state["result"] = result
    at.session_state["image"] = image
    at.run()
    assert not at.exception
    assert [b.label for b in at.button] == ["Make report"]
    at.button[0].click().run()
    assert not at.exception and not at.error
    key, files = at.session_state[STATE_KEY]
    assert set(files) == {media for _, media, _ in FORMATS}
    assert files["text/markdown"].startswith(b"# MedLens report")
    assert files["application/pdf"].startswith(b"%PDF")
    assert check_bundle(json.loads(files["application/fhir+json"])) == []
    downloads = at.get("download_button")
    assert [d.proto.label for d in downloads] == [label for label, _, _ in FORMATS]
    # The report is of the analysis shown: same domain and number of findings.
    md = files["text/markdown"].decode()
    assert len(re.findall(r"^\| \d+ \|", md, flags=re.M)) >= len(result["findings"])
    assert result["findings"][0]["name"] in md
    at.run()  # a rerun shows the same files without asking the API again
    assert at.session_state[STATE_KEY][0] == key and not at.button

    with pytest.raises(Exception, match="Not acceptable"):
        fetch_report(api, image, "chest.png", "text/csv")


def test_every_sample_templates_narrative_is_grounded(lens: MedLens, data_dir: Path) -> None:
    """The template never fails its own check, whatever the differential: a next step
    that says "soon" under a routine triage is the template's wording, not a claim."""
    from medlens.report.grounding import check_grounding

    for p in sorted((data_dir / "cxr-samples").glob("*.png")):
        report = build_report(lens.analyze(p))
        assert check_grounding(report.narrative_text, report) == [], p.name
