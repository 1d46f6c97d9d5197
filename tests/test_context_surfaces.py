"""Clinical context (issue 15) through every surface: the CLI options, the API's form
fields, the UI's form and context block. Real pipeline, real sample images; the tests hold
with or without a trained fusion head (the effect is checked only when one is used)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from medlens.api.app import create_app
from medlens.audit import AuditLog
from medlens.cli import app as cli_app
from medlens.config import Settings
from medlens.knowledge import load_domain
from medlens.pipeline import MedLens
from medlens.ui.client import ApiClient, context_form

ISIC = "isic2018-task3-test/images/ISIC_0034524.jpg"
PAD = "pad-ufes-20/images/PAT_46_881_939.jpg"  # PAD-UFES-20: smartphone photo, BCC
CXR = "cxr-samples/00000001_000.png"
PROBLEM = "application/problem+json"
CONTEXT_FIELDS = ("age", "sex", "site", "fitzpatrick", "diameter_mm", "duration_days", "history")

runner = CliRunner()


@pytest.fixture(scope="module")
def api_settings(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Settings:
    return Settings(home=tmp_path_factory.mktemp("ctx_home"), data=data_dir, api_timeout_s=600)


@pytest.fixture(scope="module")
def lens(api_settings: Settings) -> MedLens:
    return MedLens(settings=api_settings)


@pytest.fixture(scope="module")
def client(api_settings: Settings, lens: MedLens) -> TestClient:
    app = create_app(api_settings, lens=lens, load_in_background=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _post(c: TestClient, path: Path, **data: Any) -> httpx.Response:
    return c.post("/v1/analyze", files={"image": (path.name, path.read_bytes())}, data=data)


def _check_effect(ctx: dict[str, Any]) -> None:
    """With a fusion head the effect table is there; without one the note says why."""
    if ctx["fusion"] is None:
        assert ctx["used"] == [] and ctx["effect"] == []
        assert "fusion head" in ctx["note"]
    elif ctx["used"]:
        assert ctx["effect"], ctx
        for e in ctx["effect"]:
            assert 0 <= e["image_only"] <= 1 and 0 <= e["with_context"] <= 1


# -- CLI -----------------------------------------------------------------------------------
def test_cli_context_flags(data_dir: Path) -> None:
    args = ["analyze", str(data_dir / PAD), "--domain", "dermatology", "--top-k", "3"]
    args += ["--age", "63", "--sex", "F", "--site", "Back", "--fitzpatrick", "II"]
    args += ["--diameter", "6", "--duration-days", "90", "--history", "grew,bleed,no-itch"]
    res = runner.invoke(cli_app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    ctx = json.loads(res.stdout)["context"]
    assert ctx["given"] == [
        "age", "sex", "site", "fitzpatrick", "diameter_mm", "duration_days",
        "history.bleed", "history.grew", "history.itch",
    ]  # fmt: skip
    assert ctx["parsed"] == [] and ctx["not_understood"] == [] and ctx["conflicts"] == []
    assert ctx["values"] == {
        "age": 63, "sex": "female", "site": "back", "fitzpatrick": 2, "diameter_mm": 6.0,
        "duration_days": 90.0, "history": {"bleed": True, "grew": True, "itch": False},
    }  # fmt: skip
    _check_effect(ctx)
    # The human-readable output shows the same block.
    res = runner.invoke(cli_app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "Clinical context" in res.stdout
    assert "Given: age: 63, sex: female, site: back" in res.stdout
    assert "bleed: yes, grew: yes, itch: no" in res.stdout
    assert ("Effect of the context" in res.stdout) == bool(ctx["effect"])


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--age", "-3", "age must be between 0 and 120"),
        ("--age", "200", "age must be between 0 and 120"),
        ("--site", "moon", "unknown body site 'moon'"),
        ("--history", "grew,no-grew", "given both as yes and as no"),
        ("--fitzpatrick", "9", "Fitzpatrick type must be between 1 and 6"),
    ],
)
def test_cli_bad_context_is_one_line_before_any_model_work(
    data_dir: Path, tmp_path: Path, option: str, value: str, words: str
) -> None:
    folder = tmp_path / "in"  # a folder: one error, not one per image
    folder.mkdir()
    (folder / "a.jpg").write_bytes((data_dir / PAD).read_bytes())
    out = tmp_path / "out.jsonl"
    res = runner.invoke(cli_app, ["analyze", str(folder), "--out", str(out), option, value])
    assert res.exit_code == 2, res.output
    assert "InvalidContext" in res.output and words in res.output, res.output
    assert "Traceback" not in res.output and not out.exists()


def test_cli_folder_applies_the_context_to_every_image(data_dir: Path, tmp_path: Path) -> None:
    """Files are decoded one ahead in a background thread (``io.ahead``): a broken one
    between good ones is reported on its own row and the rest are analysed."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in (PAD, ISIC):
        (folder / Path(name).name).write_bytes((data_dir / name).read_bytes())
    (folder / "b-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out.jsonl"
    args = ["analyze", str(folder), "--out", str(out), "--domain", "dermatology"]
    res = runner.invoke(cli_app, [*args, "--age", "40", "--history", "itch"])
    assert res.exit_code == 0, res.output
    rows = {r["file"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(rows) == 3
    assert "CorruptImage" in rows.pop("b-broken.png")["error"]
    for r in rows.values():
        assert r["context"]["given"] == ["age", "history.itch"], r.get("error")


# -- API -----------------------------------------------------------------------------------
def test_api_form_fields_round_trip(
    client: TestClient, lens: MedLens, data_dir: Path, api_settings: Settings, caplog
) -> None:
    path = data_dir / PAD
    form = {
        "domain": "dermatology", "age": "97", "sex": "male", "site": "face",
        "fitzpatrick": "3", "diameter_mm": "", "duration_days": "  ", "history": "bleed, no-hurt",
    }  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        r = _post(client, path, **form)
    assert r.status_code == 200, r.text
    got = r.json()
    ctx = got["context"]
    # Empty fields are "not given"; an age over 89 is reported as 90 (an identifier).
    assert ctx["given"] == ["age", "sex", "site", "fitzpatrick", "history.bleed", "history.hurt"]
    assert ctx["values"] == {
        "age": 90, "sex": "male", "site": "face", "fitzpatrick": 3,
        "history": {"bleed": True, "hurt": False},
    }  # fmt: skip
    _check_effect(ctx)
    assert got["triage"]["review"] == bool(ctx["disagreement"])
    # The same as the library given the same mapping.
    want = lens.analyze(
        path,
        domain="dermatology",
        filename=path.name,
        context={"age": 97, "sex": "male", "site": "face", "fitzpatrick": 3,
                 "history": "bleed,no-hurt"},
    ).to_dict()  # fmt: skip
    got.pop("timings_ms"), want.pop("timings_ms")
    assert got == want
    # The audit record holds the analysis JSON (the capped age), nothing more of the form;
    # no log line repeats what was sent.
    rec = AuditLog.from_settings(api_settings).get(r.headers["X-Request-ID"])
    assert rec is not None and rec.output["context"] == ctx
    assert rec.output["context"]["values"]["age"] == 90
    assert '"age": 97' not in json.dumps(rec.output)
    logged = " ".join(rec_.getMessage() for rec_ in caplog.records)
    assert "face" not in logged and "bleed" not in logged and "no-hurt" not in logged


def test_api_without_context_fields_is_the_analysis_without_context(
    client: TestClient, data_dir: Path
) -> None:
    blank = dict.fromkeys(CONTEXT_FIELDS, "")  # what an HTML form sends
    r = _post(client, data_dir / ISIC, **blank)
    assert r.status_code == 200, r.text
    assert r.json()["context"] is None and r.json()["triage"]["review"] is False


def test_api_symptoms_are_read_into_the_context_and_stated_fields_win(
    client: TestClient, data_dir: Path
) -> None:
    text = "itchy spot on my face that has grown over the last months"
    r = _post(client, data_dir / PAD, domain="dermatology", symptoms=text, site="back")
    assert r.status_code == 200, r.text
    ctx = r.json()["context"]
    assert ctx["given"] == ["site"] and ctx["values"]["site"] == "back"
    assert {"history.itch", "history.grew"} <= set(ctx["parsed"])
    assert ctx["values"]["history"]["itch"] is True and ctx["values"]["history"]["grew"] is True
    assert any(c.startswith("site: given 'back'") for c in ctx["conflicts"]), ctx["conflicts"]
    assert text not in r.text and "itchy spot" not in r.text  # the text is never echoed


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("age", "-3", "age must be between 0 and 120"),
        ("age", "200", "age must be between 0 and 120"),
        ("age", "sixty", "age must be a number"),
        ("site", "moon", "unknown body site 'moon'; use one of"),
        ("history", "grew,no-grew", "'grew' is given both as yes and as no"),
        ("history", "sneezes", "unknown history item 'sneezes'"),
        ("fitzpatrick", "9", "Fitzpatrick type must be between 1 and 6"),
        ("sex", "x", "unknown sex 'x'"),
    ],
)
def test_api_bad_context_is_a_400_problem(
    client: TestClient, data_dir: Path, field: str, value: str, words: str
) -> None:
    r = _post(client, data_dir / PAD, domain="dermatology", **{field: value})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == 400 and body["type"] == "urn:medlens:problem:invalid-context"
    assert words in body["detail"], body


def test_api_chest_xray_with_context_is_not_used(
    client: TestClient, lens: MedLens, data_dir: Path
) -> None:
    path = data_dir / CXR
    r = _post(client, path, age="63", site="back", history="grew")
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["domain"] == "chest_xray"
    ctx = got["context"]
    assert "takes no clinical context" in ctx["note"]
    assert ctx["used"] == [] and ctx["effect"] == [] and ctx["disagreement"] is None
    assert sorted(ctx["not_understood"]) == ["age", "history", "site"]
    plain = lens.analyze(path, filename=path.name).to_dict()
    assert got["findings"] == plain["findings"] and got["triage"] == plain["triage"]


def test_openapi_documents_the_context_fields(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()

    def form_props(path: str) -> dict[str, Any]:
        body = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
        ref = body["schema"]["$ref"].rsplit("/", 1)[1]
        return spec["components"]["schemas"][ref]["properties"]

    props = form_props("/v1/analyze")
    assert set(CONTEXT_FIELDS) <= set(props)
    assert "back" in props["site"]["description"] and "itch" in props["history"]["description"]
    assert all("unknown" in props[f]["description"] for f in CONTEXT_FIELDS)
    if "/v1/report" in spec["paths"]:  # the report form takes no context (yet)
        assert not set(CONTEXT_FIELDS) & set(form_props("/v1/report"))


# -- UI ------------------------------------------------------------------------------------
def test_client_never_sends_unknown_as_no() -> None:
    form = context_form(
        {"age": None, "sex": "", "site": "back", "history": {"grew": True, "itch": False,
                                                             "bleed": None}}
    )  # fmt: skip
    assert form == {"site": "back", "history": "grew,no-itch"}
    assert context_form({"history": {"grew": None}}) == {} == context_form(None)


def _form_script() -> None:
    import streamlit as st

    from medlens.knowledge import load_domain
    from medlens.ui.context_form import context_inputs, render_context

    st.session_state["sent"] = context_inputs(load_domain("dermatology").domain.context)
    if "result" in st.session_state:
        render_context(st.session_state["result"])


def test_ui_form_and_context_block(client: TestClient, data_dir: Path) -> None:
    from streamlit.testing.v1 import AppTest

    vocab = load_domain("dermatology").domain.context
    at = AppTest.from_function(_form_script, default_timeout=120)
    at.run()
    assert not at.exception
    assert at.session_state["sent"] == {}  # nothing answered: nothing sent
    assert [r.value for r in at.radio] == ["unknown"] * len(vocab.history)
    assert at.selectbox(key="ctx_site").options[0] == "unknown"
    assert len(at.selectbox(key="ctx_site").options) == 1 + len(vocab.body_sites)
    at.number_input(key="ctx_age").set_value(63)
    at.selectbox(key="ctx_sex").set_value("female")
    at.selectbox(key="ctx_site").set_value("back")
    at.radio(key="ctx_grew").set_value("yes")
    at.radio(key="ctx_itch").set_value("no")
    at.selectbox(key="ctx_fitzpatrick").set_value("II")
    at.number_input(key="ctx_diameter").set_value(7.5)
    at.run()
    assert not at.exception
    sent = at.session_state["sent"]
    assert sent == {"age": 63, "sex": "female", "site": "back", "fitzpatrick": "II",
                    "diameter_mm": 7.5, "history": {"grew": True, "itch": False}}  # fmt: skip

    api = ApiClient("http://testserver")
    api._http = client  # the FastAPI TestClient is an httpx.Client: the real app
    image = (data_dir / PAD).read_bytes()
    result = api.analyze(image, "lesion.jpg", domain="dermatology", top_k=3, context=sent)
    ctx = result["context"]
    assert ctx["values"]["history"] == {"grew": True, "itch": False}  # the rest stays unknown
    assert ctx["values"]["fitzpatrick"] == 2 and ctx["values"]["diameter_mm"] == 7.5
    at.session_state["result"] = result
    at.run()
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "Clinical context" in " ".join(h.value for h in at.subheader)
    assert "age: 63" in text and "site: back" in text and "history.grew" not in text
    assert "grew: yes" in text and "itch: no" in text
    assert (len(at.dataframe) == 1) == bool(ctx["effect"])
    if ctx["note"]:
        assert ctx["note"] in " ".join(c.value for c in at.caption)
    # A parse shown back, something not understood, a conflict and a disagreement.
    shown = {
        **result,
        "triage": {**result["triage"], "review": True},
        "context": {
            **ctx,
            "parsed": ["history.bleed"],
            "values": {**ctx["values"], "history": {**ctx["values"]["history"], "bleed": True}},
            "not_understood": ["wobbly"],
            "conflicts": ["site: given 'back', the text says 'face'"],
            "disagreement": "The image points to A (80%), but the clinical context favours B",
        },
    }
    at.session_state["result"] = shown
    at.run()
    assert not at.exception
    infos = " ".join(i.value for i in at.info)
    warnings = " ".join(w.value for w in at.warning)
    assert "Read from the symptoms" in infos and "bleed: yes" in infos
    assert "Not understood:** wobbly" in warnings
    assert "site: given 'back', the text says 'face'" in warnings
    assert "clinical context favours B" in warnings


# -- Two views of one lesion -----------------------------------------------------------------
DERM7PT_CLINIC = "derm7pt/images/NEL/NEL025.JPG"  # case 1: clinical photo
DERM7PT_DERM = "derm7pt/images/NEL/Nel026.jpg"  # case 1: its dermoscopy image


def _probs(result: dict[str, Any]) -> dict[str, float]:
    return {f["id"]: f["probability"] for f in result["findings"]}


def test_dermoscopy_view_is_weighted_as_the_head_says(
    lens: MedLens, data_dir: Path, tmp_path: Path
) -> None:
    import dataclasses

    from medlens.analysis import fusion

    clinic, derm = data_dir / DERM7PT_CLINIC, data_dir / DERM7PT_DERM
    pack = load_domain("dermatology")
    head = lens.fusion_head(pack)
    assert head is not None
    one = lens.analyze(clinic, domain="dermatology").to_dict()
    other = lens.analyze(derm, domain="dermatology").to_dict()
    pair = lens.analyze(clinic, domain="dermatology", dermoscopy=derm).to_dict()
    assert one["input"]["dermoscopy"] is None
    rec = pair["input"]["dermoscopy"]
    assert rec["content_hash"] == other["input"]["content_hash"]
    assert rec["weight"] == head.dermoscopy_weight
    assert rec["weight_source"] == f"{head.fingerprint}/dermatology"
    if head.dermoscopy_weight == 1.0:  # measured: the clinical photo adds nothing (fusion.md)
        assert _probs(pair) == pytest.approx(_probs(other), abs=1e-4)
    # With an equal-weight head: symmetric, and a view paired with itself is that view.
    settings = Settings(home=tmp_path / "home", data=data_dir)
    fusion.write_head(dataclasses.replace(head, dermoscopy_weight=0.5), settings.cards_dir)
    half = MedLens(settings=settings)
    ab = half.analyze(clinic, domain="dermatology", dermoscopy=derm).to_dict()
    ba = half.analyze(derm, domain="dermatology", dermoscopy=clinic).to_dict()
    aa = half.analyze(clinic, domain="dermatology", dermoscopy=clinic).to_dict()
    assert ab["input"]["dermoscopy"]["weight"] == 0.5
    assert _probs(ab) == pytest.approx(_probs(ba), abs=1e-4)
    assert _probs(aa) == pytest.approx(_probs(one), abs=1e-4)
    assert _probs(ab) != pytest.approx(_probs(one), abs=1e-3)
    assert _probs(ab) != pytest.approx(_probs(other), abs=1e-3)


def test_dermoscopy_view_must_pass_the_same_gate(lens: MedLens, data_dir: Path) -> None:
    from medlens.errors import ConfigError, OutOfDomain, UnsupportedImage

    skin = data_dir / DERM7PT_CLINIC
    with pytest.raises(OutOfDomain, match=r"^dermoscopy image: "):
        lens.analyze(skin, dermoscopy=data_dir / CXR)
    with pytest.raises(UnsupportedImage, match=r"^dermoscopy image: "):
        lens.analyze(skin, dermoscopy=b"not an image at all")
    with pytest.raises(ConfigError, match="chest_xray domain takes one image"):
        lens.analyze(data_dir / CXR, dermoscopy=skin)


def test_dermoscopy_view_through_cli_and_api(client: TestClient, data_dir: Path) -> None:
    clinic, derm = data_dir / DERM7PT_CLINIC, data_dir / DERM7PT_DERM
    args = ["analyze", str(clinic), "--dermoscopy", str(derm), "--domain", "dermatology"]
    res = runner.invoke(cli_app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    cli = json.loads(res.stdout)
    assert cli["input"]["dermoscopy"] is not None
    files = {
        "image": (clinic.name, clinic.read_bytes()),
        "dermoscopy": (derm.name, derm.read_bytes()),
    }
    r = client.post("/v1/analyze", files=files, data={"domain": "dermatology"})
    assert r.status_code == 200, r.text
    assert r.json()["input"] == cli["input"] and _probs(r.json()) == _probs(cli)
    # An empty dermoscopy file is an error, a dermoscopy image with a chest X-ray a 400.
    files["dermoscopy"] = ("empty.jpg", b"")
    r = client.post("/v1/analyze", files=files, data={"domain": "dermatology"})
    assert r.status_code == 400 and "dermoscopy image" in r.json()["detail"], r.text
    r = client.post(
        "/v1/analyze",
        files={"image": ("cxr.png", (data_dir / CXR).read_bytes()), "dermoscopy": files["image"]},
    )
    assert r.status_code == 400 and "takes one image" in r.json()["detail"], r.text
    res = runner.invoke(cli_app, ["analyze", str(clinic.parent), "--dermoscopy", str(derm)])
    assert res.exit_code == 2 and "not a folder" in res.output, res.output


def test_api_another_language_is_marked_not_understood(client: TestClient, data_dir: Path) -> None:
    text = ("Seit drei Monaten habe ich einen braunen Fleck am Rücken, der juckt. " * 60)[:4000]
    r = _post(client, data_dir / PAD, domain="dermatology", symptoms=text, age="63")
    assert r.status_code == 200, r.text
    ctx = r.json()["context"]
    assert ctx["not_understood"] == ["symptoms"] and ctx["parsed"] == []
    assert ctx["given"] == ["age"]  # the stated field still counts
    r = _post(client, data_dir / PAD, domain="dermatology", symptoms="x" * 4001)
    assert r.status_code == 422 and "4000" in r.json()["detail"], r.text
