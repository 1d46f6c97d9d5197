"""Explanations for the lite encoder (issue 14): text-conditioned saliency, Grad-CAM,
concept scores and ``medlens explain``, on real images with the shipped model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from typer.testing import CliRunner

from medlens.analysis import scoring, zeroshot
from medlens.cli import app
from medlens.errors import ConfigError, EmptyInput, InvalidText
from medlens.explain import concepts, saliency
from medlens.io import load_image
from medlens.knowledge import domains, load_domain
from medlens.knowledge.schema import Concept
from medlens.models import load_encoder

SKIN = "isic2018-task3-test/images/ISIC_0034524.jpg"  # 224 × 224
HAM = "ham10000/images/ISIC_0025030.jpg"  # 200 × 150: not square
CXR = "cxr-samples/00000001_000.png"

runner = CliRunner()


@pytest.fixture(scope="module")
def enc():
    return load_encoder("lite")


@pytest.fixture(scope="module")
def derm():
    return load_domain("dermatology")


@pytest.fixture(scope="module")
def skin(data_dir) -> np.ndarray:
    return load_image(data_dir / SKIN).pixels


# -- pure functions -----------------------------------------------------------------------
def test_centred_gaussian_has_the_mass_and_peaks_in_the_centre():
    g = saliency.centred_gaussian((150, 200), mass=7.0)
    assert g.shape == (150, 200)
    assert g.sum() == pytest.approx(7.0, rel=1e-4)
    r, c = np.unravel_index(np.argmax(g), g.shape)
    assert abs(r - 74.5) <= 1 and abs(c - 99.5) <= 1


def test_energy_pointing_and_top_fraction_on_known_maps():
    mask = np.zeros((10, 10), bool)
    mask[:5] = True
    m = np.zeros((10, 10))
    m[2, 3] = 3.0
    m[7, 7] = 1.0
    assert saliency.energy_inside(m, mask) == pytest.approx(0.75)
    assert saliency.pointing_hit(m, mask) is True
    assert saliency.pointing_hit(m, ~mask) is False
    assert saliency.top_energy_fraction(np.ones((10, 10)), 0.1) == pytest.approx(0.1)
    assert saliency.top_energy_fraction(m, 0.1) == pytest.approx(1.0)
    assert np.isnan(saliency.energy_inside(np.zeros((10, 10)), mask))


def test_upsample_keeps_the_layout_and_scales_to_unit_range():
    grid = np.zeros((2, 3), np.float32)
    grid[0, 2] = 5.0
    up = saliency.upsample(grid, (40, 60))
    assert up.shape == (40, 60)
    assert up.min() == 0.0 and up.max() == pytest.approx(1.0)
    r, c = np.unravel_index(np.argmax(up), up.shape)
    assert r < 20 and c >= 40  # top right, where the grid's maximum is
    assert saliency.rank_correlation(up, up) == pytest.approx(1.0)


def test_queries_are_checked():
    with pytest.raises(EmptyInput):
        saliency.clean_query("   ")
    with pytest.raises(InvalidText):
        saliency.clean_query("a" * 10_000)
    with pytest.raises(InvalidText):
        saliency.clean_query("veil\x00\x01")
    assert saliency.clean_query("  blue-white veil ") == "blue-white veil"


def test_a_concept_needs_three_prompts():
    with pytest.raises(ValidationError):
        Concept(id="veil", name="Veil", prompts=("a", "b"))


# -- maps on real images ------------------------------------------------------------------
def _ok(m: np.ndarray, shape: tuple[int, ...]) -> None:
    assert m.shape == shape
    assert np.isfinite(m).all()
    assert m.min() == 0.0 and m.max() == pytest.approx(1.0)


def test_text_saliency_has_the_image_shape_for_square_and_oblong_images(enc, derm, data_dir):
    for rel in (SKIN, HAM):
        px = load_image(data_dir / rel).pixels
        s = saliency.explain(enc, px, derm, finding="melanoma")
        _ok(s.map, px.shape[:2])
        assert np.isfinite(s.grid).all() and s.grid.ndim == 2
    # the oblong 150 × 200 frame is seen whole: a wider feature grid than a square one
    assert s.grid.shape[1] > s.grid.shape[0]


def test_text_maps_differ_for_unrelated_queries_and_findings(enc, derm, skin):
    a = saliency.explain(enc, skin, derm, query="blue-white veil").map
    b = saliency.explain(enc, skin, derm, query="hair").map
    assert saliency.rank_correlation(a, b) < 0.9
    m = saliency.explain(enc, skin, derm, finding="melanoma").map
    v = saliency.explain(enc, skin, derm, finding="vitiligo").map
    assert saliency.rank_correlation(m, v) < 0.9


def test_gradcam_runs_and_differs_per_finding(enc, derm, skin):
    g_mel = saliency.explain(enc, skin, derm, finding="melanoma", method="gradcam")
    g_vasc = saliency.explain(enc, skin, derm, finding="vascular_lesion", method="gradcam")
    for g in (g_mel, g_vasc):
        _ok(g.map, skin.shape[:2])
        assert g.method == "gradcam" and (g.grid >= 0).all()
    assert saliency.rank_correlation(g_mel.map, g_vasc.map) < 0.9
    # no gradient left behind on the shared encoder
    assert all(p.grad is None for p in enc.parameters())


def test_gradcam_target_is_the_scoring_rules_logit(enc, derm, skin):
    """For a square image the Grad-CAM model's logits are the ones analyze scores
    (before test-time flips): the map explains the number the user sees."""
    import torch

    cls = zeroshot.finding_embeddings(enc, derm)
    model = saliency.FindingLogits(enc, cls, None)
    with torch.no_grad():
        z = model(saliency.frame_tensor(enc, skin)).numpy()
    ref = scoring.finding_logits(enc, derm, enc.embed_images([skin]))
    np.testing.assert_allclose(z, ref, rtol=1e-3, atol=1e-3)


def test_gradcam_target_is_the_calibrated_score(enc, derm, skin, data_dir):
    """With the card's calibration, Grad-CAM's model outputs the log of the probability
    the scoring rule reports (single-label), so the map explains that number; for a
    multi-label pack the probability is monotone in the logit and the map is unchanged."""
    import torch

    from medlens.models.card import card_for

    cal = card_for(enc).calibration
    cls = zeroshot.finding_embeddings(enc, derm)
    scored = saliency.CalibratedScore(saliency.FindingLogits(enc, cls, None), derm, cal)
    x = saliency.frame_tensor(enc, skin)
    with torch.no_grad():
        logp, z = scored(x).numpy(), scored.logits(x).numpy()
    np.testing.assert_allclose(np.exp(logp), scoring.calibrated(z, derm, cal), atol=1e-5)
    raw = saliency.gradcam(enc, skin, derm, "melanoma")
    cal_map = saliency.gradcam(enc, skin, derm, "melanoma", calibration=cal)
    assert not np.allclose(raw.grid, cal_map.grid)  # the softmax changes what counts
    cxr = load_domain("chest_xray")
    px = load_image(data_dir / CXR).pixels
    f = cxr.finding_ids[0]
    a = saliency.gradcam(enc, px, cxr, f)
    b = saliency.gradcam(enc, px, cxr, f, calibration=cal)
    np.testing.assert_allclose(a.map, b.map, atol=1e-4)


def test_chest_xray_finding_map_uses_the_reference(enc, data_dir):
    cxr = load_domain("chest_xray")
    px = load_image(data_dir / CXR).pixels
    t = saliency.finding_target(enc, cxr, cxr.finding_ids[0])
    assert t.reference is not None
    _ok(saliency.text_saliency(enc, px, t).map, px.shape[:2])
    _ok(saliency.explain(enc, px, cxr, finding=t.key, method="gradcam").map, px.shape[:2])


def test_bad_targets_raise_typed_errors(enc, derm, skin):
    with pytest.raises(ConfigError):
        saliency.explain(enc, skin, derm, finding="not_a_finding")
    with pytest.raises(ConfigError):
        saliency.explain(enc, skin, derm, query="veil", method="gradcam")
    with pytest.raises(ConfigError):
        saliency.explain(enc, skin, derm)


# -- concept scores -----------------------------------------------------------------------
def test_every_pack_concept_gets_an_uncalibrated_score(enc, data_dir):
    images = {"dermatology": SKIN, "chest_xray": CXR}
    assert set(images) <= set(domains())
    for d, rel in images.items():
        pack = load_domain(d)
        assert len(pack.domain.concepts) >= 3
        emb = enc.embed_images([load_image(data_dir / rel).pixels])[0]
        rows = concepts.concept_scores(enc, pack, emb)
        assert sorted(r["id"] for r in rows) == sorted(c.id for c in pack.domain.concepts)
        assert all(0.0 < r["score"] < 1.0 and r["calibrated"] is False for r in rows)
        assert len({r["score"] for r in rows}) > 1
    ids = [c.id for c in load_domain("dermatology").domain.concepts]
    assert {"blue_whitish_veil", "regression_structures", "atypical_pigment_network"} <= set(ids)
    assert len(ids) == 7


# -- the command --------------------------------------------------------------------------
def test_cli_json_and_overlay(data_dir, tmp_path):
    out = tmp_path / "overlay.png"
    res = runner.invoke(
        app, ["explain", str(data_dir / SKIN), "--finding", "melanoma", "--out", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    e = d["explanation"]
    assert e["target"] == "melanoma" and d["domain"] == "dermatology"
    h, w = e["grid_shape"]
    assert len(e["grid"]) == h and len(e["grid"][0]) == w
    assert 0.1 <= e["top10_energy"] <= 1.0
    assert 0 <= e["peak"]["grid"][0] < h and 0 <= e["peak"]["grid"][1] < w
    assert 0.0 <= d["finding_probability"] <= 1.0
    assert len(d["concepts"]) == 7
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 224


def test_cli_query_in_another_script_gives_a_map(data_dir):
    res = runner.invoke(app, ["explain", str(data_dir / SKIN), "--query", "黑色素瘤", "--json"])
    assert res.exit_code == 0, res.output
    e = json.loads(res.stdout)["explanation"]
    assert e["target"] == "query" and np.isfinite(np.array(e["grid"])).all()


@pytest.mark.parametrize(
    "args, error",
    [
        (["--finding", "not_a_finding"], "ConfigError"),
        (["--query", ""], "EmptyInput"),
        (["--query", "x" * 10_000], "InvalidText"),
        (["--finding", "melanoma", "--query", "veil"], "ConfigError"),
        (["--method", "lime"], "ConfigError"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(data_dir, args, error):
    res = subprocess.run(
        [sys.executable, "-m", "medlens.cli", "explain", str(data_dir / SKIN), *args],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert error in res.stderr


# -- the shared explanation and its cache -------------------------------------------------
def test_explain_image_explains_the_probability_analyze_reports(data_dir):
    from medlens.explain import explanation
    from medlens.pipeline import MedLens

    lens = MedLens(retrieval=False)
    explanation.clear_cache()
    ex = explanation.explain_image(lens, data_dir / SKIN)
    a = lens.analyze(data_dir / SKIN)
    top = a.findings[0]
    assert ex.saliency.target == top.id
    assert ex.finding_probability == pytest.approx(float(top.probability), abs=1e-6)
    d = ex.to_dict()
    assert d["top_findings"][0]["id"] == top.id and d["concepts"]
    # the second call is served from the cache: the very same map object
    again = explanation.explain_image(lens, data_dir / SKIN, analysis=a)
    assert again.saliency is ex.saliency
    key = explanation.cache_key("h", "fp", ex.pack, "text", None, "blue-white veil")
    assert "blue-white veil" not in "".join(key)
    maps = explanation.attach_maps(lens, a, data_dir / SKIN, top=3)
    assert [m["target"] for m in maps] == [f.id for f in a.findings[:3]]


# -- POST /v1/explain ---------------------------------------------------------------------
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def api(tmp_path_factory, data_dir):
    from fastapi.testclient import TestClient

    from medlens.api.app import create_app
    from medlens.config import Settings
    from medlens.pipeline import MedLens

    s = Settings(home=tmp_path_factory.mktemp("explain_api"), data=data_dir, api_timeout_s=600)
    app = create_app(s, lens=MedLens(settings=s), load_in_background=False)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.settings = s
        yield c


def _explain(c, path, headers=None, **data):
    return c.post(
        "/v1/explain",
        files={"image": (path.name, path.read_bytes())},
        data=data,
        headers=headers or {},
    )


def _problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status and body["detail"] and "Traceback" not in r.text
    return body


def test_api_announces_explain(api):
    assert api.get("/v1/info").json()["capabilities"]["explain"] is True
    assert "/v1/explain" in api.get("/openapi.json").json()["paths"]


def test_api_json_for_the_top_finding_matches_analyze(api, data_dir):
    from medlens.audit import AuditLog

    r = _explain(api, data_dir / SKIN)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    d = r.json()
    e = d["explanation"]
    h, w = e["grid_shape"]
    assert len(e["grid"]) == h and len(e["grid"][0]) == w and d["domain"] == "dermatology"
    a = api.post("/v1/analyze", files={"image": ("x.jpg", (data_dir / SKIN).read_bytes())}).json()
    assert e["target"] == a["findings"][0]["id"]
    assert d["finding_probability"] == pytest.approx(a["findings"][0]["probability"], abs=1e-4)
    rec = AuditLog.from_settings(api.settings).get(r.headers["X-Audit-ID"])
    assert rec is not None and rec.output["explanation"]["target"] == e["target"]
    assert rec.output["explanation"]["media_type"] == "application/json"


def test_api_png_overlay_and_gradcam(api, data_dir):
    import io

    r = _explain(
        api, data_dir / HAM, headers={"Accept": "image/png"}, finding="melanoma", method="gradcam"
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.format == "PNG" and im.width > 200
    tex = _explain(api, data_dir / HAM, headers={"Accept": "image/png"}, query="$\\frac{a$ 🙂")
    assert tex.status_code == 200, tex.text  # mathtext and emoji in a title are plain text
    faint = _explain(api, data_dir / HAM, headers={"Accept": "image/*"}, alpha="0.1")
    assert faint.status_code == 200 and faint.headers["content-type"] == "image/png"


def test_api_query_in_another_script_and_no_echo_in_the_audit(api, data_dir):
    from medlens.audit import AuditLog

    r = _explain(api, data_dir / SKIN, query="蓝白色幕")
    assert r.status_code == 200, r.text
    e = r.json()["explanation"]
    assert e["target"] == "query" and np.isfinite(np.array(e["grid"])).all()
    rec = AuditLog.from_settings(api.settings).get(r.headers["X-Audit-ID"])
    assert "蓝白色幕" not in json.dumps(rec.output, ensure_ascii=False)
    assert len(rec.output["explanation"]["query_sha256"]) == 64


def test_api_chest_xray_finding(api, data_dir):
    cxr = load_domain("chest_xray")
    r = _explain(api, data_dir / CXR, finding=cxr.finding_ids[0])
    assert r.status_code == 200, r.text
    assert r.json()["domain"] == "chest_xray"


@pytest.mark.parametrize(
    "data, status",
    [
        ({"finding": "not_a_finding"}, 400),
        ({"query": ""}, 400),
        ({"query": "   "}, 400),
        ({"query": "x" * 10_000}, 422),
        ({"query": "veil\x00\x01"}, 422),
        ({"finding": "melanoma", "query": "veil"}, 400),
        ({"query": "veil", "method": "gradcam"}, 400),
        ({"method": "lime"}, 422),
        ({"alpha": "2"}, 422),
        ({"finding": "melanoma", "domain": "chest_xray"}, 400),
    ],
)
def test_api_bad_targets_are_clear_4xx(api, data_dir, data, status):
    _problem(_explain(api, data_dir / SKIN, **data), status)


def test_api_bad_uploads_and_accept(api, data_dir):
    r = api.post("/v1/explain", files={"image": ("notes.txt", b"just some text " * 10)})
    _problem(r, 415)
    _problem(api.post("/v1/explain", files={"image": ("e.png", b"")}), 400)
    png = (data_dir / CXR).read_bytes()
    _problem(api.post("/v1/explain", files={"image": ("cut.png", png[: len(png) // 3])}), 422)
    _problem(api.post("/v1/explain", json={"image": "x"}), 415)
    _problem(_explain(api, data_dir / SKIN, headers={"Accept": "application/pdf"}), 406)


# -- the benchmarks -----------------------------------------------------------------------
def _bench(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_deletion_batches_and_curve_auc():
    import torch

    q = _bench("explain_quality")
    assert q.curve_auc(np.ones(5)) == pytest.approx(1.0)
    assert q.curve_auc(np.linspace(1, 0, 11)) == pytest.approx(0.5)
    x = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(1, 2, 2, 3) + 1
    order = np.array([5, 0, 3, 1, 2, 4])
    b = q.perturbation_batch(x, order, 3, x, torch.zeros_like(x))
    assert b.shape == (4, 2, 2, 3)
    assert torch.equal(b[0], x[0]) and (b[3] == 0).all()
    flat = b[1].reshape(2, 6)
    assert (flat[:, [5, 0]] == 0).all() and (flat[:, [3, 1, 2, 4]] > 0).all()
    # insertion: from a start image, the first pixels of the order come from the input
    ins = q.perturbation_batch(x, order, 3, torch.zeros_like(x), x)
    assert (ins[0] == 0).all() and torch.equal(ins[3], x[0])
    # imputed deletion: kept pixels stay, a hole in a flat image takes its value, a hole
    # is filled from its surroundings (not from what was there), all deleted → the mean
    flat = torch.full((1, 3, 37, 50), 2.0)
    known = torch.ones(1, 1, 37, 50)
    known[..., 10:20, 15:30] = 0
    filled = q.push_pull(flat * known + (1 - known) * 9.0, known)
    assert torch.allclose(filled, flat, atol=1e-5)
    ramp = torch.linspace(0, 1, 50).expand(1, 3, 37, 50).clone()
    assert (q.push_pull(ramp, known) - ramp).abs().max() < 0.15
    b = q.imputed_deletion_batch(ramp, np.random.default_rng(0).permutation(37 * 50), 4)
    assert b.shape == (5, 3, 37, 50) and torch.equal(b[0], ramp[0]) and (b[4] == 0).all()
    # the criteria map to the pack's concepts
    assert set(q.CRITERIA) == {c.id for c in load_domain("dermatology").domain.concepts}


@pytest.mark.slow
def test_explain_quality_script_smoke(tmp_path, data_dir):
    out, js = tmp_path / "q.md", tmp_path / "q.json"
    res = subprocess.run(
        [
            sys.executable,
            "benchmarks/explain_quality.py",
            "--limit",
            "2",
            "--steps",
            "2",
            "--out",
            str(out),
            "--json",
            str(js),
        ],
        cwd=_bench("explain_quality").ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(js.read_text())
    assert [f["dataset"] for f in d["faithfulness"]] == [
        "isic2018",
        "pneumoniamnist",
        "covid_chestxray",
    ]
    for f in d["faithfulness"]:
        assert f["n"] == 2 and f["steps"] == 2
        assert f["split"] == "test"
        for curve in ("deletion_impute", "deletion", "insertion"):
            for m in ("random", "random_map", "text", "gradcam"):
                assert 0.0 <= f[curve][m]["mean"] <= 1.0
            for m in ("text", "gradcam"):  # paired against both random orders
                assert set(f[curve][m]["vs"]) == {"random", "random_map"}
    assert len(d["concepts"]["criteria"]) == 7 and d["localisation"]["n"] == 2
    md = out.read_text()
    assert "python benchmarks/explain_quality.py --limit 2 --steps 2" in md
    for section in ("Faithfulness", "Prompt sensitivity", "Concept detection", "Localisation"):
        assert section in md


@pytest.mark.slow
def test_explain_latency_script_smoke(tmp_path, data_dir):
    out = tmp_path / "lat.json"
    res = subprocess.run(
        [sys.executable, "benchmarks/explain_latency.py", "--smoke", "--out", str(out)],
        cwd=_bench("explain_quality").ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(out.read_text())
    for kind in ("skin", "chest"):
        r = d["images"][kind]
        assert r["p50_ms"]["analyze"] > 0 and r["ratio_p50"]["analyze + maps"] > 0


# -- Grad-CAM for an open_clip ViT tower (tiny, randomly initialised, built here) ---------
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _check_two_vit_maps(enc, px, derm, params, cropped: bool) -> None:
    """Grad-CAM of a tiny random ViT tower (4 x 4 patches) for two findings: maps in the
    image's geometry, one per target, no gradient left on the weights."""
    a = saliency.explain(enc, px, derm, finding="melanoma", method="gradcam")
    b = saliency.explain(enc, px, derm, finding="vitiligo", method="gradcam")
    for s in (a, b):
        # random weights: the positive part of a CAM may be empty (then the map is zero)
        assert s.map.shape == px.shape[:2] and np.isfinite(s.map).all()
        assert s.map.min() >= 0.0 and s.map.max() <= 1.0
        assert s.grid.shape == (4, 4) and np.isfinite(s.grid).all() and s.grid.any()
        if cropped:  # zero outside the centre square the tower saw
            assert (s.map[:, :25] == 0).all() and (s.map[:, -25:] == 0).all()
    assert saliency.rank_correlation(a.grid, b.grid) < 0.999  # one map per target
    assert all(p.grad is None for p in params)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    import open_clip
    import torch

    from medlens.models.open_clip_encoder import OpenClipEncoder

    cfg_dir = tmp_path_factory.mktemp("explain_open_clip_configs")
    (cfg_dir / "medlens-explain-tiny-vit.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    return OpenClipEncoder("medlens-explain-tiny-vit")  # random weights, no download


def test_vit_reshape_drops_the_class_token():
    import torch

    t = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # cls + 2x2 patches
    out = saliency.vit_reshape((2, 2))(t)
    assert out.shape == (2, 3, 2, 2)
    assert torch.equal(out[0, :, 0, 1], t[0, 2])  # patch 1 = token 2 (token 0 is cls)
    lnd = saliency.vit_reshape((2, 2), batch_first=False)(t.transpose(0, 1))
    assert torch.equal(lnd, out)


def test_vit_gradcam_targets_the_scoring_logit_and_differs_per_finding(tiny_vit, derm, data_dir):
    import torch
    from PIL import Image as PILImage

    enc = tiny_vit
    assert saliency.is_open_clip_vit(enc) and not saliency.is_open_clip_vit(load_encoder("lite"))
    px = load_image(data_dir / HAM).pixels  # 150 x 200: the crop is the centre square
    cls = zeroshot.finding_embeddings(enc, derm)
    model = saliency.EmbeddingLogits(enc.model.visual, cls, None, enc.logit_scale)
    with torch.no_grad():
        z = model(enc.preprocess(PILImage.fromarray(px))[None]).numpy()
    np.testing.assert_allclose(
        z, scoring.finding_logits(enc, derm, enc.embed_images([px])), rtol=1e-4, atol=1e-4
    )
    _check_two_vit_maps(enc, px, derm, enc.model.parameters(), cropped=True)
    with pytest.raises(ConfigError, match="lite"):
        saliency.explain(enc, px, derm, finding="melanoma", method="text")


def test_api_dicom_is_explained_in_its_own_geometry_without_identifiers(api, data_dir):
    from medlens.io import load_image as decode

    path = data_dir / "cxr-samples/Fake_MONOHR1.dcm"
    r = _explain(api, path)
    assert r.status_code == 200, r.text
    d = r.json()
    decoded = decode(path)
    assert d["input"]["shape"] == list(decoded.pixels.shape[:2])
    values = [str(v) for v in decoded.identifiers.values.values() if len(str(v)) >= 4]
    assert values and not any(v in r.text for v in values)


def test_api_abstains_on_a_photo_of_a_cat_and_audits_it(api):
    import io

    from medlens.audit import AuditLog
    from medlens.evaluation.ood_sets import build

    # A brick-wall texture: an image no domain resembles (natural photos are borderline
    # for the gate, docs/ood.md; this test is about the abstention's handling).
    brick = dict(build("textures"))["brick.png"]
    buf = io.BytesIO()
    Image.fromarray(brick).save(buf, format="PNG")
    r = api.post("/v1/explain", files={"image": ("brick.png", buf.getvalue())})
    body = _problem(r, 422)
    assert body["type"].endswith("out-of-domain")
    rec = AuditLog.from_settings(api.settings).get(r.headers["X-Request-ID"])
    assert rec is not None and rec.triage_level == "abstained"


def test_analyze_explain_attaches_maps_for_the_top_findings(data_dir, tmp_path) -> None:
    """``medlens analyze --explain`` adds one text-saliency map per top finding (top 3), in
    the order of the differential, to the same JSON analyze prints."""
    env = {"MEDLENS_HOME": str(tmp_path / "home")}
    r = runner.invoke(app, ["analyze", str(data_dir / SKIN), "--explain", "--json"], env=env)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    maps = out["explanations"]
    assert [m["target"] for m in maps] == [f["id"] for f in out["findings"][:3]]
    for m in maps:
        grid = np.array(m["grid"])
        assert grid.shape == tuple(m["grid_shape"]) and 0.0 <= grid.min() <= grid.max() <= 1.0
        assert 0.1 <= m["top10_energy"] <= 1.0
    plain = runner.invoke(app, ["analyze", str(data_dir / SKIN), "--json"], env=env)
    assert "explanations" not in json.loads(plain.stdout.strip().splitlines()[-1])


# -- Grad-CAM for transformers ViT towers and the supervised chest X-ray classifier -----
@pytest.fixture(scope="module", params=["clip", "siglip"])
def tiny_hf(request, tmp_path_factory):
    """A tiny randomly initialised transformers CLIP / SigLIP saved to a folder and
    loaded as ``hf:`` (built as in test_models: hub models never download in tests)."""
    from test_models import _tiny_hf

    from medlens.models import clear_encoder_cache

    model, proc, tok, _ = _tiny_hf(request.param)
    folder = tmp_path_factory.mktemp(f"explain-tiny-{request.param}")
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    tok.save_pretrained(folder)
    clear_encoder_cache()
    return load_encoder(f"hf:{folder}")


def test_hf_vit_gradcam_targets_the_scoring_logit_in_the_image_geometry(tiny_hf, derm, data_dir):
    import torch
    from PIL import Image as PILImage

    enc = tiny_hf
    assert saliency.is_hf_vit(enc) and not saliency.is_open_clip_vit(enc)
    px = load_image(data_dir / HAM).pixels  # 150 x 200
    cls = zeroshot.finding_embeddings(enc, derm)
    model = saliency.EmbeddingLogits(
        saliency.HFImageFeatures(enc.model), cls, None, enc.logit_scale
    )
    x = enc.image_processor(images=[PILImage.fromarray(px)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        z = model(x).numpy()
    ref = scoring.finding_logits(enc, derm, enc.embed_images([px]))
    np.testing.assert_allclose(z, ref, rtol=1e-4, atol=1e-4)
    # CLIP's processor crops the centre square; SigLIP's resizes the whole frame
    _check_two_vit_maps(enc, px, derm, enc.model.parameters(), enc.model_type == "clip")


@pytest.fixture(scope="module")
def tiny_txv(tmp_path_factory):
    """A randomly initialised torchxrayvision-layout DenseNet121 in a weight file."""
    import torch

    from medlens.models.txv import DEFAULT_PATHOLOGIES, TxvClassifier, build_densenet121

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("explain-txv") / "txv-random.pt"
    names = list(DEFAULT_PATHOLOGIES)
    torch.save({"state_dict": build_densenet121().state_dict(), "pathologies": names}, path)
    return TxvClassifier(path)


def test_classifier_gradcam_explains_the_classifiers_output(tiny_txv, enc, data_dir):
    cxr = load_domain("chest_xray")
    px = load_image(data_dir / CXR).pixels
    clf = tiny_txv
    found = sorted(clf.findings)
    a = saliency.explain(enc, px, cxr, finding=found[0], method="gradcam", classifier=clf)
    b = saliency.explain(enc, px, cxr, finding=found[1], method="gradcam", classifier=clf)
    for s in (a, b):
        _ok(s.map, px.shape[:2])
        assert s.method == "gradcam" and s.grid.shape == (7, 7)
    assert not np.allclose(a.grid, b.grid)  # one map per output
    assert all(p.grad is None for p in clf.model.parameters())
    # the same call without the classifier explains the zero-shot encoder instead
    zs = saliency.explain(enc, px, cxr, finding=found[0], method="gradcam")
    assert zs.grid.shape != a.grid.shape or not np.allclose(zs.grid, a.grid)
    with pytest.raises(ConfigError, match="does not score"):
        saliency.classifier_gradcam(clf, px, "no_finding_here")
    # through explain_image (CLI, API, UI): a lens with the classifier explains it
    from medlens import MedLens
    from medlens.explain.explanation import explain_image

    lens = MedLens(classifiers=[f"txv:{clf.path}"], retrieval=False)
    ex = explain_image(lens, data_dir / CXR, finding=found[0], method="gradcam")
    np.testing.assert_allclose(ex.saliency.grid, a.grid, rtol=1e-4, atol=1e-6)
