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
    # split it was chosen on, and the next positive's probability would not.
    d = collect(lite, DATA)["chest_xray"].stacked()
    p = probabilities(d, "multi_label", t)
    ids = [f.id for f in lite_pack()]
    for fid, th in ths.items():
        k = ids.index(fid)
        rows = d["mask"][:, k]
        y, pk = d["targets"][rows, k] > 0, p[rows, k]
        sens = (pk[y] >= th).mean()
        assert sens >= TARGET, (fid, sens)
        higher = np.sort(pk[y][pk[y] > th + 1e-6])
        if len(higher):
            assert (pk[y] >= higher[0]).mean() < TARGET
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

    from medlens.training.commands import register

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
