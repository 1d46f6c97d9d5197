"""Calibration on real validation data (PneumoniaMNIST + COVID-19 val splits) with the
shipped lite model; written into a *copy* of the heads file, never the packaged one."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from medlens.datasets import load_dataset
from medlens.models.lite import DEFAULT_HEADS_PATH, LiteEncoder
from medlens.training.calibrate import (
    calibrate,
    collect,
    probabilities,
    threshold_for_sensitivity,
    write_calibration,
)

DATA = ("pneumoniamnist", "covid_chestxray")
TARGET = 0.9


@pytest.fixture(scope="module")
def lite(data_dir: Path) -> LiteEncoder:
    return LiteEncoder.load(DEFAULT_HEADS_PATH)


@pytest.fixture(scope="module")
def result(lite: LiteEncoder) -> dict[str, Any]:
    return calibrate("lite", DATA, TARGET, encoder=lite)


def test_threshold_is_the_largest_reaching_the_target() -> None:
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.65])
    pos = np.array([1, 1, 1, 0, 1, 0], bool)
    assert threshold_for_sensitivity(p, pos, 0.75) == 0.7  # 3 of 4 positives
    assert threshold_for_sensitivity(p, pos, 1.0) == 0.1
    assert threshold_for_sensitivity(p, pos, 0.2) == 0.9
    with pytest.raises(ValueError):
        threshold_for_sensitivity(p, np.zeros(6, bool), 0.9)


def test_calibration_on_validation(result: dict[str, Any], lite: LiteEncoder) -> None:
    assert set(result["temperature"]) == {"chest_xray"}
    t = result["temperature"]["chest_xray"]
    assert 0 < t < 100
    rep = result["report"]["chest_xray"]
    assert rep["nll_after"] <= rep["nll_before"]  # T = 1 was a candidate: NLL-optimal
    assert rep["ece_after"] <= rep["ece_before"]
    assert set(rep["datasets"]) == set(DATA) and rep["n"] == sum(
        v["n"] for v in rep["datasets"].values()
    )
    assert {k: v["split"] for k, v in result["fitted_on"].items()} == dict.fromkeys(DATA, "val")

    # Urgent findings with validation positives get thresholds; routine ones never do.
    ths = result["thresholds"]["chest_xray"]
    assert {"pneumonia", "covid19_pneumonia"} <= set(ths)
    assert "no_finding" not in ths
    assert rep["thresholds"]["pneumonia"]["positives"] == 135 + 11

    # Recomputed independently from the scores: each threshold reaches the target on the
    # pool and on every source with >= 20 positives, and on the source that set it the
    # next positive's probability would not.
    d = collect(lite, DATA)["chest_xray"].stacked()
    p = probabilities(d, "multi_label", t)
    ids = [f.id for f in lite_pack()]
    for fid, th in ths.items():
        k = ids.index(fid)
        rows = d["mask"][:, k]
        y, pk = d["targets"][rows, k] > 0, p[rows, k]
        sens = (pk[y] >= th).mean()
        assert sens >= TARGET, (fid, sens)
        src = d["source"][rows]
        for name in np.unique(src):
            ys = y & (src == name)
            if ys.sum() >= 20:
                assert (pk[ys] >= th).mean() >= TARGET, (fid, name)
        setter = rep["thresholds"][fid]["set_by"]
        ys = y if setter == "all (pooled)" else y & (src == setter)
        higher = np.sort(pk[ys][pk[ys] > th + 1e-6])
        if len(higher):
            assert (pk[ys] >= higher[0]).mean() < TARGET
        assert rep["thresholds"][fid]["sensitivity"] == pytest.approx(sens, abs=1e-4)
        assert rep["thresholds"][fid]["specificity"] == pytest.approx(
            (pk[~y] < th).mean(), abs=1e-4
        )


def lite_pack() -> Any:
    from medlens.knowledge import load_domain

    return load_domain("chest_xray").findings


def test_write_calibration_round_trip_matches_the_pipeline(
    result: dict[str, Any], lite: LiteEncoder, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from medlens.pipeline import MedLens

    heads = tmp_path / "lite_heads.safetensors"
    shutil.copyfile(DEFAULT_HEADS_PATH, heads)
    write_calibration(heads, result)
    before, after = load_file(str(DEFAULT_HEADS_PATH)), load_file(str(heads))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    enc = LiteEncoder.load(heads)
    assert enc.calibration == json.loads(json.dumps(result))
    assert enc.meta.get("recipe") == lite.meta.get("recipe")  # provenance kept
    assert enc.fingerprint == lite.fingerprint  # tensors, not calibration, are hashed

    # The pipeline, run on this encoder, gives exactly the calibrated probabilities.
    m = load_dataset("pneumoniamnist")
    recs = [r for r in m.records if r.split == "val"][:3]
    images = [m.image(r) for r in recs]
    np.testing.assert_array_equal(enc.embed_images(images), lite.embed_images(images))
    d = collect(enc, ("pneumoniamnist",), limit=None)["chest_xray"].stacked()
    all_ids = [r.id for r in m.records if r.split == "val"]
    p = probabilities(d, "multi_label", result["temperature"]["chest_xray"])
    k = [f.id for f in lite_pack()].index("pneumonia")
    lens = MedLens("lite")
    lens._encoder = enc
    for rec, img in zip(recs, images, strict=True):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out = lens.analyze(buf.getvalue(), domain="chest_xray")
        got = {f["id"]: f["probability"] for f in out.findings}["pneumonia"]
        assert got == pytest.approx(p[all_ids.index(rec.id), k], abs=1e-4)
        th = result["thresholds"]["chest_xray"]["pneumonia"]
        assert ("pneumonia" in out.triage.triggered_by) == (got >= th) or abs(got - th) < 1e-4


def test_write_calibration_rejects_missing_file(tmp_path: Path) -> None:
    from medlens.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable):
        write_calibration(tmp_path / "nope.safetensors", {"temperature": {}})


def test_calibrate_command_writes_a_heads_copy(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from medlens.cli.train import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    heads = tmp_path / "heads.safetensors"
    shutil.copyfile(DEFAULT_HEADS_PATH, heads)
    heads.chmod(0o644)
    out = tmp_path / "cal.json"
    args = ["calibrate", "--data", "pneumoniamnist", "--limit", "60", "--heads", str(heads)]
    res = CliRunner().invoke(app, [*args, "--write", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "Temperature and ECE" in res.output and "pneumonia" in res.output
    written = json.loads(out.read_text())
    assert LiteEncoder.load(heads).calibration == written
    assert written["fitted_on"]["pneumoniamnist"]["n"] == 60
    assert heads.stat().st_mode & 0o777 == 0o644
    bad = CliRunner().invoke(app, ["calibrate", "--data", "no_such_dataset", "--limit", "5"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_bias_corrected_temperature_scaling_undoes_a_prior_shift() -> None:
    """Logits from a model trained on balanced classes, scored on data where class 0 is
    common: the fitted offsets raise class 0, the NLL drops below temperature-only."""
    from medlens.analysis.calibration import (
        fit_temperature,
        fit_temperature_and_bias,
        softmax_nll,
    )

    rng = np.random.default_rng(0)
    y = rng.choice(4, size=4000, p=[0.7, 0.1, 0.1, 0.1])
    z = rng.normal(size=(4000, 4)) * 1.5
    z[np.arange(4000), y] += 2.0  # balanced-prior evidence only
    t_only = fit_temperature(z, y)
    t, b = fit_temperature_and_bias(z, y)
    assert b[0] > b[1:].max() + 0.5
    assert softmax_nll(z + b, y, t) < softmax_nll(z, y, t_only) - 0.05
    acc = lambda zz: float((zz.argmax(1) == y).mean())  # noqa: E731
    assert acc(z + b) > acc(z)
    t0, b0 = fit_temperature_and_bias(np.zeros((0, 3)), np.zeros(0, int))
    assert t0 == 1.0 and not b0.any()


def test_single_label_calibration_round_trip_with_offsets(
    lite: LiteEncoder, tmp_path: Path
) -> None:
    """Dermatology (softmax) calibration stores a temperature and per-finding offsets;
    the pipeline then gives exactly softmax((z + b) / T) for a PAD-UFES-20 val image."""
    from medlens.knowledge import load_domain
    from medlens.pipeline import MedLens

    res = calibrate("lite", ("pad_ufes_20",), TARGET, encoder=lite)
    pack = load_domain("dermatology")
    assert set(res["bias"]["dermatology"]) == set(pack.finding_ids)
    rep = res["report"]["dermatology"]
    assert rep["nll_after"] <= rep["nll_before"]
    heads = tmp_path / "lite_heads.safetensors"
    shutil.copyfile(DEFAULT_HEADS_PATH, heads)
    write_calibration(heads, res)
    enc = LiteEncoder.load(heads)
    d = collect(enc, ("pad_ufes_20",))["dermatology"].stacked()
    bias = np.array([res["bias"]["dermatology"][f] for f in pack.finding_ids])
    p = probabilities(d, "single_label", res["temperature"]["dermatology"], bias)
    m = load_dataset("pad_ufes_20")
    val = [r for r in m.records if r.split == "val" and r.path is not None]
    lens = MedLens("lite")
    lens._encoder = enc
    out = lens.analyze(val[0].path.read_bytes(), domain="dermatology")
    got = np.array([{f["id"]: f["probability"] for f in out.findings}[f] for f in pack.finding_ids])
    row = [r.id for r in val].index(val[0].id)
    np.testing.assert_allclose(got[got > 1e-3], p[row][got > 1e-3], atol=1e-4)


def test_calibrate_write_gives_an_hf_model_its_card(tmp_path: Path, data_dir: Path) -> None:
    """Any backend can be calibrated: ``calibrate --write`` for an hf model writes a model
    card keyed by its fingerprint, and ``analyze`` then applies it and records its id."""
    from test_models import _tiny_hf
    from typer.testing import CliRunner

    from medlens.cli import app
    from medlens.config import get_settings
    from medlens.models import load_encoder
    from medlens.models.card import card_for
    from medlens.models.registry import clear_encoder_cache
    from medlens.pipeline import MedLens

    model, proc, tok, _ = _tiny_hf("clip")
    folder = tmp_path / "tiny-clip"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    tok.save_pretrained(folder)
    clear_encoder_cache()
    spec = f"hf:{folder}"
    args = ["calibrate", "--model", spec, "--data", "pad_ufes_20,pneumoniamnist"]
    r = CliRunner().invoke(app, [*args, "--limit", "60", "--write", "--json"])
    assert r.exit_code == 0, r.output
    enc = load_encoder(spec)
    cards = get_settings().cards_dir
    card = card_for(enc, cards)
    assert card.source == "home" and (cards / f"{enc.fingerprint}.json").is_file()
    assert set(card.calibration.temperature) == {"dermatology", "chest_xray"}
    image = next((data_dir / "isic2018-task3-test" / "images").glob("*.jpg"))
    result = MedLens(model=spec, retrieval=False).analyze(image, domain="dermatology")
    assert result.to_dict()["model"]["calibration"] == card.calibration.id
