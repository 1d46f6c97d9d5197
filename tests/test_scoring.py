"""The one scoring rule and the model card, on arrays (no data needed), plus the card
lookup order on the real lite encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medlens.analysis import scoring
from medlens.knowledge import load_domain
from medlens.models.base import l2_normalize
from medlens.models.card import Calibration, card_for, write_card

rng = np.random.default_rng(0)


def _unit(n: int, d: int = 16) -> np.ndarray:
    return l2_normalize(rng.normal(size=(n, d)))


def test_logits_are_scaled_cosines_relative_to_the_reference() -> None:
    img, cls, ref = _unit(4), _unit(3), _unit(1)
    z = scoring.logits_from(img, cls, 20.0)
    np.testing.assert_allclose(z, 20.0 * img @ cls.T, rtol=1e-6)
    zr = scoring.logits_from(img, cls, 20.0, ref)
    np.testing.assert_allclose(zr, 20.0 * (img @ cls.T - img @ ref.T), rtol=1e-5, atol=1e-5)


def test_differential_is_softmax_of_offset_logits_over_temperature() -> None:
    z = rng.normal(size=(5, 4)) * 3
    b = np.array([0.5, -1.0, 0.0, 2.0])
    p = scoring.probabilities(z, "single_label", 2.0, b)
    e = np.exp((z + b) / 2.0)
    np.testing.assert_allclose(p, e / e.sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)


def test_multi_label_is_an_independent_sigmoid_per_finding() -> None:
    z = rng.normal(size=(5, 4)) * 3
    p = scoring.probabilities(z, "multi_label", 0.5)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-z / 0.5)), rtol=1e-6)
    assert not np.allclose(p.sum(1), 1.0)


def test_calibrated_restricts_the_differential_to_the_given_columns() -> None:
    pack = load_domain("dermatology")
    k = len(pack.finding_ids)
    z = rng.normal(size=(3, k))
    cal = Calibration.from_dict(
        {"temperature": {"dermatology": 1.5}, "bias": {"dermatology": {"melanoma": 1.0}}}
    )
    cols = [pack.finding_ids.index(f) for f in ("melanoma", "melanocytic_nevus", "dermatofibroma")]
    p = scoring.calibrated(z, pack, cal, columns=cols)
    b = cal.bias_for("dermatology", pack.finding_ids)[cols]
    assert b[0] == 1.0 and b[1] == 0.0
    np.testing.assert_allclose(p, scoring.probabilities(z[:, cols], "single_label", 1.5, b))
    assert p.shape == (3, 3)


def test_fusion_adds_weighted_symptom_logits_and_none_is_image_only() -> None:
    a, b = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    np.testing.assert_allclose(scoring.fuse(a, b, 0.5), a + 0.5 * b)
    assert scoring.fuse(a, None, 0.5) is a


def test_calibration_round_trip_and_id() -> None:
    raw = {
        "temperature": {"dermatology": 1.2},
        "bias": {"dermatology": {"melanoma": -0.3}},
        "thresholds": {"dermatology": {"melanoma": 0.04}},
        "report": {"note": "kept"},
    }
    cal = Calibration.from_dict(raw)
    assert cal.temperature_for("dermatology") == 1.2 and cal.temperature_for("chest_xray") == 1.0
    assert cal.thresholds_for("dermatology") == {"melanoma": 0.04}
    assert Calibration.from_dict(cal.to_dict()) == cal
    assert cal.id and len(cal.id) == 12
    other = Calibration.from_dict({**raw, "thresholds": {"dermatology": {"melanoma": 0.05}}})
    assert other.id != cal.id
    assert Calibration().id is None and not Calibration()


def test_card_lookup_prefers_a_home_card_keyed_by_fingerprint(tmp_path: Path) -> None:
    from medlens.models import load_encoder

    enc = load_encoder("lite")
    shipped = card_for(enc, tmp_path)
    assert shipped.source == "weights" and shipped.calibration
    assert shipped.fingerprint == enc.fingerprint
    local = Calibration.from_dict({"temperature": {"dermatology": 3.0}})
    from dataclasses import replace

    path = write_card(replace(shipped, calibration=local), tmp_path)
    assert json.loads(path.read_text())["fingerprint"] == enc.fingerprint
    found = card_for(enc, tmp_path)
    assert found.source == "home" and found.calibration.temperature_for("dermatology") == 3.0
    # A card for other weights is never applied.
    raw = json.loads(path.read_text())
    raw["fingerprint"] = "0" * 16
    path.write_text(json.dumps(raw))
    assert card_for(enc, tmp_path).source == "weights"


@pytest.mark.parametrize("task", ["single_label", "multi_label"])
def test_probabilities_are_finite_for_extreme_logits(task: str) -> None:
    z = np.array([[1e4, -1e4, 0.0]])
    p = scoring.probabilities(z, task, 1.0)
    assert np.isfinite(p).all()


def test_a_corrupt_or_non_finite_card_is_an_error_never_a_score(tmp_path: Path) -> None:
    from medlens.errors import ModelUnavailable
    from medlens.models import load_encoder

    enc = load_encoder("lite")
    path = tmp_path / f"{enc.fingerprint}.json"
    path.write_text("{not json")
    with pytest.raises(ModelUnavailable, match="corrupt"):
        card_for(enc, tmp_path)
    path.write_text(
        json.dumps({"fingerprint": enc.fingerprint, "calibration": {"temperature": {"x": "nan"}}})
    )
    with pytest.raises(ModelUnavailable, match="non-finite"):
        card_for(enc, tmp_path)
    with pytest.raises(ValueError):
        Calibration.from_dict({"temperature": {"dermatology": 0.0}})


def test_non_finite_scores_raise_instead_of_triaging() -> None:
    from medlens.errors import ModelUnavailable
    from medlens.models import load_encoder

    enc = load_encoder("lite")
    pack = load_domain("dermatology")
    broken = np.full(enc.dim, np.nan, dtype=np.float32)
    with pytest.raises(ModelUnavailable, match="non-finite"):
        scoring.score(enc, pack, broken, Calibration())
    ok = scoring.score(enc, pack, _unit(1, enc.dim)[0], Calibration())
    assert np.isclose(ok.probabilities.sum(), 1.0)


# -- consistency: mutually exclusive findings (issue 13, item 7) --------------------------
def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_no_finding_is_capped_by_the_strongest_abnormal_finding() -> None:
    """The reported case: no finding 0.58 beside COVID-19 pneumonia 0.96 and hernia 0.79."""
    pack = load_domain("chest_xray")
    ids = pack.finding_ids
    z = np.full((1, len(ids)), _logit(0.05))
    for fid, p in (("no_finding", 0.58), ("covid19_pneumonia", 0.96), ("hernia", 0.79)):
        z[0, ids.index(fid)] = _logit(p)
    p = scoring.calibrated(z, pack, Calibration())[0]
    assert p[ids.index("no_finding")] == pytest.approx(0.04)
    assert p[ids.index("covid19_pneumonia")] == pytest.approx(0.96)  # abnormal untouched
    assert p[ids.index("hernia")] == pytest.approx(0.79)
    # Restricted to a dataset's columns, the rule still saw the whole row.
    cols = [ids.index("no_finding"), ids.index("pneumonia")]
    np.testing.assert_allclose(scoring.calibrated(z, pack, Calibration(), columns=cols)[0], p[cols])
    # Without a contradiction nothing changes.
    z[0, ids.index("covid19_pneumonia")] = z[0, ids.index("hernia")] = _logit(0.3)
    q = scoring.calibrated(z, pack, Calibration())[0]
    assert q[ids.index("no_finding")] == pytest.approx(0.58)


@settings(max_examples=200, deadline=None)
@given(
    z=arrays(np.float64, (4, 19), elements=st.floats(-30, 30)),
    t=st.floats(0.05, 20.0),
)
def test_consistency_invariant_over_random_logits(z: np.ndarray, t: float) -> None:
    """p(no finding) + max p(abnormal) ≤ 1 for any logits and temperature; abnormal
    findings are never changed; the rule is idempotent."""
    pack = load_domain("chest_xray")
    nf = pack.finding_ids.index("no_finding")
    cal = Calibration.from_dict({"temperature": {"chest_xray": t}})
    p = scoring.calibrated(z, pack, cal)
    raw = scoring.probabilities(z, "multi_label", t)
    abnormal = np.delete(p, nf, axis=1)
    assert np.all(p[:, nf] + abnormal.max(axis=1) <= 1.0 + 1e-12)
    np.testing.assert_array_equal(abnormal, np.delete(raw, nf, axis=1))
    assert np.all(p[:, nf] <= raw[:, nf])
    np.testing.assert_array_equal(scoring.consistent(p, pack.exclusions), p)


def test_consistency_applies_only_to_declared_exclusions() -> None:
    p = np.array([[0.9, 0.8, 0.7]])
    np.testing.assert_array_equal(scoring.consistent(p, ()), p)
    np.testing.assert_allclose(scoring.consistent(p, [(2, [0])]), [[0.9, 0.8, 0.1]])
    derm = load_domain("dermatology")
    assert derm.exclusions == ()  # a differential is exclusive by construction
