"""Clinical context and its learned fusion with the image (issue 15): the context type,
dataset codings on the real datasets, the fusion head file, and the pipeline rule that
context moves the differential but never lowers a triage."""

from __future__ import annotations

import numpy as np
import pytest

from medlens import MedLens
from medlens.analysis import fusion as F
from medlens.analysis.context import (
    ClinicalContext,
    build_context,
    from_record,
    merge_parsed,
    parse_history,
)
from medlens.datasets import load_dataset
from medlens.errors import InvalidContext, ModelUnavailable
from medlens.knowledge import load_domain
from medlens.training.fusion import fit_weight, group_folds

SKIN = "isic2018-task3-test/images/ISIC_0034524.jpg"
CXR = "cxr-samples/00000001_000.png"


@pytest.fixture(scope="module")
def vocab():
    return load_domain("dermatology").domain.context


@pytest.fixture(scope="module")
def lens() -> MedLens:
    return MedLens(retrieval=False)


# -- the context type ---------------------------------------------------------------------
def test_build_context_normalises_user_values(vocab):
    ctx = build_context(
        vocab,
        age="63",
        sex="F",
        site="Back",
        fitzpatrick="III",
        diameter_mm="6",
        history="grew, bleed, no-itch",
    )
    assert ctx.age == 63 and ctx.sex == "female" and ctx.site == "back"
    assert ctx.fitzpatrick == 3 and ctx.diameter_mm == 6.0
    assert ctx.history == {"grew": True, "bleed": True, "itch": False}
    assert set(ctx.given()) == {
        "age",
        "sex",
        "site",
        "fitzpatrick",
        "diameter_mm",
        "history.grew",
        "history.bleed",
        "history.itch",
    }
    # a word the vocabulary lists for a site maps to it (forearm -> arm)
    assert build_context(vocab, site="forearm").site == "arm"
    assert build_context(vocab, age="", sex=" ", site=None).empty  # forms send blanks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"age": -3}, "between 0 and 120"),
        ({"age": 200}, "between 0 and 120"),
        ({"age": "sixty"}, "must be a number"),
        ({"age": float("nan")}, "between 0 and 120"),
        ({"site": "moon"}, "unknown body site"),
        ({"sex": "robot"}, "unknown sex"),
        ({"fitzpatrick": 9}, "between 1 and 6"),
        ({"fitzpatrick": 2.5}, "whole number"),
        ({"diameter_mm": 0}, "between"),
        ({"history": "grew,no-grew"}, "both as yes and as no"),
        ({"history": "glows"}, "unknown history item"),
        ({"history": {"bleed": "maybe"}}, "yes or no"),
    ],
)
def test_impossible_context_is_a_clear_error(vocab, kwargs, message):
    with pytest.raises(InvalidContext, match=message):
        build_context(vocab, **kwargs)


def test_unknown_stays_unknown_and_encodes_as_no_evidence(vocab):
    assert parse_history("", vocab) == {}
    empty = ClinicalContext()
    assert not F.encode(empty, vocab).any()
    no = build_context(vocab, history="no-bleed")
    yes = build_context(vocab, history="bleed")
    i = F.feature_names(vocab).index("history.bleed")
    assert F.encode(no, vocab)[i] == -1 and F.encode(yes, vocab)[i] == 1
    assert F.encode(empty, vocab)[i] == 0


def test_text_never_overrides_a_stated_field(vocab):
    given = build_context(vocab, age=40, history="no-bleed")
    parsed = ClinicalContext(age=41, sex="male", history={"bleed": True, "itch": True})
    merged = merge_parsed(given, parsed)
    assert merged.age == 40 and merged.history["bleed"] is False
    assert merged.sex == "male" and merged.history["itch"] is True
    assert set(merged.parsed) == {"sex", "history.itch"}
    assert any(c.startswith("age") for c in merged.conflicts)
    assert any(c.startswith("history.bleed") for c in merged.conflicts)


# -- dataset codings on the real data ------------------------------------------------------
def test_dataset_codings_map_every_known_value(vocab, data_dir):
    pad = load_dataset("pad_ufes_20")
    ctxs = [from_record(r.meta, "pad_ufes_20", vocab) for r in pad.records]
    # every PAD region and sex code maps to a vocabulary value; UNK answers stay unknown
    assert all(c.site is not None for c in ctxs)
    for c, r in zip(ctxs, pad.records, strict=True):
        assert (c.sex is None) == (r.meta.get("gender") in (None, ""))
        assert ("grew" in c.history) == (r.meta.get("grew") in ("True", "False"))
    ham = load_dataset("ham10000")
    hctx = [from_record(r.meta, "ham10000", vocab) for r in ham.records]
    unknown_site = sum(r.meta.get("localization") in (None, "unknown") for r in ham.records)
    assert sum(c.site is None for c in hctx) == unknown_site
    d7 = load_dataset("derm7pt")
    dctx = [from_record(r.meta, "derm7pt", vocab) for r in d7.records]
    flat = [
        c.history.get("elevation")
        for c, r in zip(dctx, d7.records, strict=True)
        if r.meta.get("elevation") == "flat"
    ]
    assert flat and not any(flat)


# -- the head file ----------------------------------------------------------------------
def test_fusion_head_round_trip_and_corruption(tmp_path, vocab):
    names = tuple(F.feature_names(vocab))
    w = np.arange(2 * len(names), dtype=float).reshape(2, -1) / 100
    head = F.FusionHead("abc", "dermatology", F.FIELDS, names, ("melanoma", "nevus"), w)
    path = F.write_head(head, tmp_path)
    back = F.read_head(path)
    assert back.findings == head.findings and np.array_equal(back.weight, w)
    assert F.find_head("abc", "dermatology", tmp_path) is not None
    assert F.find_head("other", "dermatology", tmp_path) is None
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelUnavailable, match="corrupt"):
        F.read_head(path)


def test_fit_weight_learns_context_evidence_and_nothing_else():
    rng = np.random.default_rng(0)
    n, k = 3000, 3
    c = rng.choice([-1.0, 0.0, 1.0], size=(n, 2))
    u = rng.normal(size=(n, k))
    true_w = np.array([[2.0, 0.0], [0.0, 0.0], [-2.0, 0.0]])  # feature 2 is noise
    p = np.exp(u + c @ true_w.T)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    w = fit_weight(u, c, y, range(k), 1e-4)
    assert abs((w[0, 0] - w[2, 0]) - 4.0) < 0.6  # softmax identifies differences only
    assert np.abs(w[:, 1] - w[:, 1].mean()).max() < 0.25
    only_first = fit_weight(u, c, y, [0], 1e-4)
    assert np.all(only_first[1:] == 0)


def test_group_folds_never_split_a_group():
    groups = np.array([f"p{i % 37}" for i in range(500)])
    folds = group_folds(groups)
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1
    assert len(set(folds)) == 5


def test_disagreement_needs_a_confident_image_and_a_clear_margin():
    ids, names = ["a", "b", "c"], ["A", "B", "C"]
    confident = np.array([0.8, 0.1, 0.1])
    assert F.disagreement(ids, names, confident, np.array([0.0, 2.0, 0.0])) is not None
    assert F.disagreement(ids, names, confident, np.array([0.0, 0.5, 0.0])) is None
    assert F.disagreement(ids, names, np.array([0.4, 0.35, 0.25]), np.array([0, 3.0, 0])) is None
    assert F.disagreement(ids, names, confident, np.array([2.0, 0.0, 0.0])) is None


# -- the pipeline -----------------------------------------------------------------------
def test_no_context_is_the_image_alone(lens, data_dir):
    plain = lens.analyze(data_dir / SKIN)
    empty = lens.analyze(data_dir / SKIN, context={"age": "", "history": ""})
    assert [f.probability for f in plain.findings] == [f.probability for f in empty.findings]
    assert plain.context is None
    assert empty.context is not None and empty.context.used == []


def test_context_moves_the_differential_through_the_shipped_head(lens, data_dir):
    r = lens.analyze(
        data_dir / SKIN, context={"age": 75, "sex": "male", "site": "face", "history": "bleed,grew"}
    )
    ctx = r.context
    assert ctx is not None and ctx.fusion is not None, ctx and ctx.note
    assert set(ctx.used) >= {"age", "sex", "site", "history.bleed", "history.grew"}
    assert ctx.values["age"] == 75 and ctx.values["history"] == {"bleed": True, "grew": True}
    moved = [e for e in ctx.effect if abs(e.image_only - e.with_context) > 1e-3]
    assert moved, "an informative context must move some finding"
    assert abs(sum(f.probability for f in r.findings) - 1) < 1e-3
    alone = lens.analyze(data_dir / SKIN)
    order = {"routine": 0, "soon": 1, "urgent": 2}
    assert order[r.triage.level] >= order[alone.triage.level]  # never lowered


def test_age_over_89_is_reported_as_90(lens, data_dir):
    r = lens.analyze(data_dir / SKIN, context={"age": 97})
    assert r.context.values["age"] == 90


def test_chest_xray_records_that_context_was_not_used(lens, data_dir):
    r = lens.analyze(data_dir / CXR, context={"age": 63, "site": "back"})
    assert r.domain == "chest_xray"
    assert r.context is not None and r.context.used == []
    assert "takes no clinical context" in (r.context.note or "")


def test_bad_context_fails_before_any_work(lens, data_dir):
    with pytest.raises(InvalidContext):
        lens.analyze(data_dir / SKIN, context={"age": 200})


def test_unknown_context_field_is_a_clear_error(lens, data_dir):
    with pytest.raises(InvalidContext, match="unknown context field"):
        lens.analyze(data_dir / SKIN, context={"agee": 63})
    # an empty history mapping is "not given", in any domain
    assert lens.analyze(data_dir / CXR, context={"history": {}}).context is None
