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
