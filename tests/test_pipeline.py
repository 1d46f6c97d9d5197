"""End to end: the MedLens facade and the CLI on real sample images with the shipped lite model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medlens import MedLens
from medlens.cli import app
from medlens.errors import ConfigError, CorruptImage, InvalidText
from medlens.knowledge import load_domain
from medlens.models import load_encoder, onnx_lite

SKIN = "isic2018-task3-test/images/ISIC_0034524.jpg"
CXR = "cxr-samples/00000001_000.png"
DICOM = "cxr-samples/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


@pytest.fixture(scope="module")
def lens() -> MedLens:
    return MedLens()


def test_skin_image_gives_a_dermatology_differential(lens, data_dir):
    r = lens.analyze(data_dir / SKIN)
    d = r.to_dict()
    assert d["domain"] == "dermatology" and d["domain_detection"]["source"] == "image"
    probs = [f["probability"] for f in r.findings]
    assert sum(probs) == pytest.approx(1.0, abs=1e-3)  # single-label: a full differential
    assert probs == sorted(probs, reverse=True)
    assert len(d["findings"]) == 5
    assert {"id", "name", "probability", "icd10", "risk"} <= set(d["findings"][0])
    assert d["triage"]["level"] in {"urgent", "soon", "routine"} and d["triage"]["reason"]
    assert d["descriptions"][0]["sections"]["presentation"]
    assert d["model"]["fingerprint"] == lens.encoder.fingerprint


def test_chest_xray_png_and_dicom_go_to_the_chest_pack(lens, data_dir):
    png = lens.analyze(data_dir / CXR).to_dict()
    assert png["domain"] == "chest_xray"
    dcm = lens.analyze(data_dir / DICOM).to_dict()
    assert dcm["domain"] == "chest_xray"
    ids = {f.id for f in load_domain("chest_xray").findings}
    assert {f["id"] for f in png["findings"]} <= ids


def test_dermatology_scores_are_invariant_to_mirroring(lens, data_dir):
    """Skin findings are scored on the mean embedding over the image and its horizontal,
    vertical and double flips (the domain's ``test_time_flips``): that set is closed
    under flipping, so a mirrored photo must get the same differential. Chest X-rays are
    scored as they are (a flipped chest is different anatomy)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(data_dir / SKIN).convert("RGB"))
    assert pixels.shape[0] == pixels.shape[1]  # square: no off-by-one centre crop

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
        return buf.getvalue()

    runs = [lens.analyze(png(a), domain="dermatology") for a in (pixels, pixels[:, ::-1])]
    a, b = ({f["id"]: f["probability"] for f in r.findings} for r in runs)
    assert a == pytest.approx(b, abs=2e-4)  # reports round to 4 decimals
    # The flips rode in the gate's forward pass: no second one.
    assert "encode_flips" not in runs[0].timings_ms
    assert "encode_flips" not in lens.analyze(data_dir / CXR).timings_ms


def test_views_batched_into_the_first_forward_score_as_a_second_forward_would(lens, data_dir):
    """``analyze`` guesses from the pixels which flips to batch into the gate's forward
    pass (colour: the dermatology flips; grey: none). The guess may change only the
    latency: a photo whose flips were not in the first forward pass (a wrong guess)
    takes them in a second one and scores as it does when they rode in the first."""

    import numpy as np
    from PIL import Image

    from medlens.analysis.domain import is_grey, likely_flips

    colour = np.asarray(Image.open(data_dir / SKIN).convert("RGB"))
    grey = np.repeat(np.asarray(Image.open(data_dir / SKIN).convert("L"))[..., None], 3, -1)
    cxr = np.asarray(Image.open(data_dir / CXR).convert("RGB"))
    assert not is_grey(colour) and is_grey(grey) and is_grey(cxr)
    derm_flips = load_domain("dermatology").domain.test_time_flips
    assert likely_flips(colour) == derm_flips and likely_flips(cxr) == ()
    assert likely_flips(grey, "dermatology") == derm_flips  # a named domain is obeyed

    decoded = lens.decode(data_dir / SKIN)
    one = lens.admit(decoded, "dermatology", flips=derm_flips)
    two = lens.admit(decoded, "dermatology")  # no flips in its forward: a second one
    timings: dict = {}
    second = lens._scoring_embedding(load_domain("dermatology"), decoded.pixels, two, timings)
    first = lens._scoring_embedding(load_domain("dermatology"), decoded.pixels, one, {})
    assert "encode_flips" in timings and set(two.flip_embeddings) == set(derm_flips)
    np.testing.assert_allclose(first, second, atol=1e-5)


def test_domain_can_be_forced(lens, data_dir):
    r = lens.analyze(data_dir / SKIN, domain="dermatology")
    assert r.domain == "dermatology" and r.domain_source == "given"
    # Forcing the wrong domain abstains instead (tests/test_ood.py).


def test_symptoms_change_the_differential_and_are_never_echoed(lens, data_dir):
    text = "itchy dry red patches in the elbow creases since childhood, flares in winter"
    base = lens.analyze(data_dir / SKIN).to_dict()
    with_sym = lens.analyze(data_dir / SKIN, symptoms=text).to_dict()
    assert with_sym["symptoms"]["closest_findings"]
    assert with_sym["findings"] != base["findings"]
    assert text not in json.dumps(with_sym)
    eczema = {f["id"] for f in with_sym["symptoms"]["closest_findings"]}
    assert eczema & {
        "atopic_dermatitis",
        "nummular_eczema",
        "hand_dermatitis",
        "lichen_simplex",
        "pruritus",
        "prurigo",
    }


def test_same_input_same_output(lens, data_dir):
    a = lens.analyze(data_dir / SKIN).to_dict()
    b = lens.analyze((data_dir / SKIN).read_bytes()).to_dict()
    assert (
        a["findings"] == b["findings"] and a["input"]["content_hash"] == b["input"]["content_hash"]
    )


def test_bad_inputs_raise_typed_errors(lens, tmp_path):
    broken = tmp_path / "x.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 50)
    with pytest.raises(CorruptImage):
        lens.analyze(broken)
    with pytest.raises(ConfigError):
        lens.analyze(broken, domain="cardiology")
    with pytest.raises(InvalidText):
        lens.analyze(broken, symptoms="y" * 100_000)


runner = CliRunner()


def test_cli_json_schema(data_dir):
    res = runner.invoke(app, ["analyze", str(data_dir / SKIN), "--json", "--top-k", "3"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert {"domain", "model", "findings", "triage"} <= set(d)
    assert len(d["findings"]) == 3
    assert {"name", "fingerprint"} <= set(d["model"])
    assert {"level", "reason"} <= set(d["triage"])


def test_cli_table_output(data_dir):
    res = runner.invoke(app, ["analyze", str(data_dir / CXR)])
    assert res.exit_code == 0, res.output
    assert "Triage" in res.stdout and "Differential" in res.stdout


def test_cli_prints_quality_warnings_and_abstains_in_one_line(data_dir, tmp_path):
    res = runner.invoke(app, ["analyze", str(data_dir / "cxr-samples" / "Fake_MONOHR1.dcm")])
    assert res.exit_code == 0, res.output
    want = "Warning: low quality" if "DICOM header says" in res.stdout else "Triage"
    assert want in res.stdout
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(blank)
    res = runner.invoke(app, ["analyze", str(blank)])
    assert res.exit_code == 2 and "abstains" in res.output
    assert "Traceback" not in res.output


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    res = subprocess.run(
        [sys.executable, "-m", "medlens.cli", "analyze", str(text)], capture_output=True, text=True
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "UnsupportedImage" in res.stderr


def test_cli_missing_file_exit_2(tmp_path):
    res = runner.invoke(app, ["analyze", str(tmp_path / "nope.png")])
    assert res.exit_code == 2


def test_cli_folder_mode_writes_jsonl_and_records_failures(data_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("00000001_000.png", "h0001.png"):
        (folder / name).write_bytes((data_dir / "cxr-samples" / name).read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["analyze", str(folder), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert sum("error" in r for r in rows) == 1
    assert all(r["domain"] == "chest_xray" for r in rows if "error" not in r)
    csv_out = tmp_path / "out.csv"
    assert runner.invoke(app, ["analyze", str(folder), "--out", str(csv_out)]).exit_code == 0
    assert csv_out.read_text().splitlines()[0].startswith("file,domain,top_finding")


def test_patient_identifiers_never_reach_output_logs_or_caches(data_dir, tmp_path, monkeypatch):
    import pydicom

    home = tmp_path / "home"
    monkeypatch.setenv("MEDLENS_HOME", str(home))
    ds = pydicom.dcmread(data_dir / DICOM)
    ds.PatientName = "Doe^Janet"
    ds.PatientBirthDate = "19510203"
    ds.PatientAddress = "12 Harbour Road, Springfield"
    path = tmp_path / "study.dcm"
    ds.save_as(path)
    res = runner.invoke(app, ["analyze", str(path), "--json"])
    assert res.exit_code == 0, res.output
    secrets = ["Doe", "Janet", "19510203", "Harbour", str(ds.PatientID)]
    assert not any(s in res.stdout for s in secrets)
    written = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in written)  # logging did happen
    # The ONNX graph is 16 MB of weights, where a 3-letter name turns up by chance ("Doe"
    # does): it must be byte for byte the export of a home that never saw patient data.
    clean = tmp_path / "clean_cache"
    assert onnx_lite.export(load_encoder("lite"), "lite", clean) is not None
    graphs = {p.name: p.read_bytes() for p in (clean / "onnx").glob("*.onnx")}
    assert graphs, "the analysis ran on the ONNX engine, which caches its graph"
    for p in written:
        blob = p.read_bytes()
        if p.suffix == ".onnx":
            assert graphs.get(p.name) == blob, p
            continue
        assert not any(s.encode() in blob for s in secrets), p


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm"])
def test_dicom_outside_every_pack_abstains(name: str) -> None:
    """A CT, MR or ultrasound object is not scored as skin or chest: a typed error, exit 2,
    never a differential or a triage (the packs' dicom rules decide)."""
    from pydicom.data import get_testdata_file

    from medlens.errors import OutOfDomain
    from medlens.pipeline import MedLens

    path = get_testdata_file(name)
    with pytest.raises(OutOfDomain, match="abstains"):
        MedLens(retrieval=False).analyze(path)
    with pytest.raises(OutOfDomain):  # a forced domain does not override the header
        MedLens(retrieval=False).analyze(path, domain="dermatology")
    res = runner.invoke(app, ["analyze", str(path), "--json"])
    assert res.exit_code == 2 and "OutOfDomain" in res.output and not res.stdout.strip()


def test_a_radiograph_of_another_body_part_abstains(data_dir, tmp_path) -> None:
    import pydicom

    from medlens.errors import OutOfDomain
    from medlens.pipeline import MedLens

    ds = pydicom.dcmread(data_dir / DICOM)
    ds.BodyPartExamined = "HAND"
    path = tmp_path / "hand.dcm"
    ds.save_as(path)
    with pytest.raises(OutOfDomain, match="HAND"):
        MedLens(retrieval=False).analyze(path)
    chest = MedLens(retrieval=False).analyze(data_dir / DICOM)
    assert chest.domain == "chest_xray" and chest.domain_source == "dicom"


def test_an_image_analysis_with_warm_caches_never_loads_the_text_tower(lens, data_dir):
    """Cold start (issue 17): importing transformers and reading MiniLM, or importing
    torchvision, is most of a fresh process's first result; with the prompt embeddings
    cached (here by the module's lens), an image without symptom text needs neither."""
    lens.analyze(data_dir / SKIN)  # fills this MEDLENS_HOME's prompt caches
    lens.analyze(data_dir / CXR)
    code = (
        "import sys\n"
        "from medlens import MedLens\n"
        "lens = MedLens()\n"
        f"for p in ({str(data_dir / SKIN)!r}, {str(data_dir / CXR)!r}):\n"
        "    a = lens.analyze(p)\n"
        "    assert a.findings, p\n"
        "print('transformers' in sys.modules, 'torchvision' in sys.modules)\n"
        "lens.analyze(" + repr(str(data_dir / SKIN)) + ", symptoms='itchy for weeks')\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True
    )
    # neither transformers (MiniLM) nor torchvision (models.mobilenet rebuilds its parts)
    assert out.stdout.split() == ["False", "False", "True"], out.stderr[-2000:]
