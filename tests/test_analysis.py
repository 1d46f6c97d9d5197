"""Zero-shot scoring, triage and symptom validation on the real knowledge packs."""

import numpy as np
import pytest

from medlens.analysis import scoring, zeroshot
from medlens.analysis.symptoms import clean_symptoms
from medlens.analysis.triage import level_thresholds, triage
from medlens.errors import EmptyInput, InvalidText
from medlens.knowledge import load_domain
from medlens.models.base import ensemble


def test_single_label_probabilities_sum_to_one_and_follow_similarity():
    rng = np.random.default_rng(0)
    cls = rng.normal(size=(5, 16))
    cls /= np.linalg.norm(cls, axis=1, keepdims=True)
    img = cls[3] + 0.1 * rng.normal(size=16)
    img /= np.linalg.norm(img)
    p = zeroshot.single_label_probs(zeroshot.similarity_logits(img, cls, 50.0))
    assert p.shape == (1, 5)
    assert p.sum() == pytest.approx(1.0)
    assert p.argmax() == 3
    # A higher temperature flattens the distribution but keeps the ranking.
    hot = zeroshot.single_label_probs(zeroshot.similarity_logits(img, cls, 50.0), temperature=5.0)
    assert hot.max() < p.max() and hot.argmax() == 3


def test_multi_label_is_sigmoid_of_difference_to_reference():
    logits = np.array([[3.0, -1.0, 0.0]])  # already relative to a reference logit of 0
    p = scoring.probabilities(logits, "multi_label")
    assert p[0, 2] == pytest.approx(0.5)
    assert p[0, 0] == pytest.approx(1 / (1 + np.exp(-3.0)))
    assert 0 < p[0, 1] < 0.5


def test_ensemble_is_unit_norm():
    v = ensemble(np.eye(4)[:2])
    assert np.linalg.norm(v) == pytest.approx(1.0)


def test_triage_urgent_when_melanoma_passes_threshold_even_if_not_top1():
    derm = load_domain("dermatology")
    t = level_thresholds("dermatology")["urgent"]
    probs = {f.id: 0.0 for f in derm.findings}
    probs["melanocytic_nevus"] = 1 - (t + 0.05)
    probs["melanoma"] = t + 0.05
    result = triage(derm, probs)
    assert result.level == "urgent"
    assert result.triggered_by == ("melanoma",)
    assert "Melanoma" in result.reason


def test_triage_routine_when_only_benign_findings():
    derm = load_domain("dermatology")
    probs = {f.id: 0.0 for f in derm.findings}
    probs["melanocytic_nevus"] = 0.95
    probs["melanoma"] = 0.01
    result = triage(derm, probs)
    assert result.level == "routine"
    assert (
        "Melanocytic" in result.reason
        or "naevus" in result.reason.lower()
        or "nevus" in result.reason.lower()
    )


def test_triage_per_finding_thresholds_take_precedence():
    cxr = load_domain("chest_xray")
    probs = {f.id: 0.05 for f in cxr.findings}
    probs["pneumothorax"] = 0.2
    assert triage(cxr, probs).level != "urgent"
    assert triage(cxr, probs, thresholds={"pneumothorax": 0.15}).level == "urgent"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", EmptyInput),
        ("   ", EmptyInput),
        ("x" * 5000, InvalidText),
        ("\x00\x01\x02\x03" * 20, InvalidText),
        ("12 34", InvalidText),
    ],
)
def test_bad_symptom_text_is_refused_with_a_clear_error(text, error):
    with pytest.raises(error):
        clean_symptoms(text, max_chars=4000)


def test_symptom_text_is_normalised():
    assert clean_symptoms("  itchy, growing lesion  ", 4000) == "itchy, growing lesion"
    assert clean_symptoms(None, 4000) is None
