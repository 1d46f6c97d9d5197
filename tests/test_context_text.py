"""Free-text symptoms -> clinical context (analysis/context_text.py, issue 15 item 2)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from medlens.analysis.context import ClinicalContext, merge_parsed
from medlens.analysis.context_text import ParsedSymptoms, parse_symptoms
from medlens.knowledge import load_domain

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import context_parser  # noqa: E402

DEV_SET = ROOT / "tests/data/symptom_sentences.yaml"
# Floors set below the measured development-set scores (0.99 precision, 0.98 recall,
# docs/context_parser.md) so that a real regression fails while wording tweaks do not.
PRECISION_FLOOR = 0.93
RECALL_FLOOR = 0.90


@pytest.fixture(scope="module")
def vocab():
    return load_domain("dermatology").domain.context


def ctx(text: str, vocab) -> ClinicalContext:
    return parse_symptoms(text, vocab).context


def test_development_set_precision_and_recall(vocab):
    sentences = context_parser.load_set(DEV_SET)
    assert len(sentences) >= 70
    res = context_parser.score(sentences, vocab)
    overall = res["overall"]
    assert overall["precision"] >= PRECISION_FLOOR, res["errors"]
    assert overall["recall"] >= RECALL_FLOOR, res["errors"]
    for field in ("sex", "site", "history.itch", "history.bleed", "history.hurt"):
        assert res["fields"][field]["f1"] >= 0.85, (field, res["fields"][field])


def test_the_set_is_varied_enough():
    sentences = context_parser.load_set(DEV_SET)
    negated = [s for s in sentences if False in (s["expect"].get("history") or {}).values()]
    durations = [s for s in sentences if "duration_days" in s["expect"]]
    empty = [s for s in sentences if not s["expect"]]
    assert len(negated) >= 20 and len(durations) >= 15 and len(empty) >= 5


@pytest.mark.parametrize(
    ("text", "history"),
    [
        ("no bleeding", {"bleed": False}),
        ("Patient denies itching.", {"itch": False}),
        ("not itchy", {"itch": False}),
        ("it has not grown", {"grew": False}),
        ("it hasn't grown", {"grew": False}),
        ("without pain", {"hurt": False}),
        ("painless", {"hurt": False}),
        ("non-tender nodule", {"hurt": False, "elevation": True}),
        ("Bleeding: no", {"bleed": False}),
        ("it is flat", {"elevation": False}),  # the derm7pt coding's word for "not raised"
    ],
)
def test_negations(vocab, text, history):
    assert ctx(text, vocab).history == history


def test_neither_nor_and_lists(vocab):
    assert ctx("It neither itches nor bleeds.", vocab).history == {"itch": False, "bleed": False}
    c = ctx("No itching, bleeding or pain, but it has grown.", vocab)
    assert c.history == {"itch": False, "bleed": False, "hurt": False, "grew": True}
    # a comma without a following and/or/nor list ends the negation
    assert ctx("no bleeding, itchy at night", vocab).history == {"bleed": False, "itch": True}


@pytest.mark.parametrize(
    "text",
    [
        "I'm not sure if it grew.",
        "Maybe it bleeds?",
        "?bleeding",
        "Come back if it bleeds.",
        "Is it growing?",
        "It might be getting bigger.",
    ],
)
def test_hedges_leave_items_unknown(vocab, text):
    c = ctx(text, vocab)
    assert c.history == {} and c.not_understood == () and c.conflicts == ()


@pytest.mark.parametrize(
    ("text", "days"),
    [
        ("itchy for 3 months", 3 * 30.44),
        ("it has grown over 3 months", 3 * 30.44),
        ("since 2 weeks", 14),
        ("2-year history of a lesion", 2 * 365.25),
        ("for a few days", 3),
        ("noticed it 6 weeks ago", 42),
        ("present for 1.5 years", 1.5 * 365.25),
        ("for a year and a half", 1.5 * 365.25),
        ("itchy for 2 weeks, the mole has been there for 3 years", 3 * 365.25),
    ],
)
def test_durations(vocab, text, days):
    assert ctx(text, vocab).duration_days == pytest.approx(days, rel=0.01)


def test_unnumbered_years_stay_unknown(vocab):
    c = ctx("It has been itchy for years.", vocab)
    assert c.duration_days is None and c.history == {"itch": True}
    assert any("for years" in n for n in c.not_understood)
    assert ctx("I take the tablet twice a day", vocab).duration_days is None


@pytest.mark.parametrize(
    ("text", "age", "sex"),
    [
        ("63-year-old man", 63, "male"),
        ("aged 63", 63, None),
        ("63 yo", 63, None),
        ("age 63", 63, None),
        ("a 45 year old woman", 45, "female"),
        ("45 yo F", 45, "female"),
        ("63M, lesion on the back", 63, "male"),
    ],
)
def test_age_and_sex(vocab, text, age, sex):
    c = ctx(text, vocab)
    assert (c.age, c.sex) == (age, sex)


def test_pronouns_count_only_outside_first_person(vocab):
    assert ctx("He says it hurts.", vocab).sex == "male"
    assert ctx("My mother says she has the same spot; mine itches.", vocab).sex is None


@pytest.mark.parametrize(
    ("text", "site"),
    [
        ("on the back of the hand", "hand"),
        ("on the back of my left hand", "hand"),
        ("on the lower back", "back"),
        ("on the sole of the foot", "acral"),
        ("on the back of the neck", "neck"),
        ("it came back on my left cheek", "face"),
    ],
)
def test_sites(vocab, text, site):
    assert ctx(text, vocab).site == site


def test_diameter_and_fitzpatrick(vocab):
    assert ctx("6 mm", vocab).diameter_mm == 6
    assert ctx("1.2 cm", vocab).diameter_mm == 12
    assert ctx("6x4mm papule", vocab).diameter_mm == 6
    assert ctx("Fitzpatrick type III", vocab).fitzpatrick == 3
    assert ctx("skin type 2.", vocab).fitzpatrick == 2


def test_full_sentence_and_residual(vocab):
    res = parse_symptoms("63-year-old man, itchy mole on the back for 3 months, no bleeding", vocab)
    c = res.context
    assert (c.age, c.sex, c.site) == (63, "male", "back")
    assert c.duration_days == pytest.approx(91.32)
    assert c.history == {"itch": True, "bleed": False}
    assert set(c.parsed) == {"age", "sex", "site", "duration_days", "history.itch", "history.bleed"}
    assert res.residual == "mole"
    # the text completes explicit fields and never overrides them
    merged = merge_parsed(ClinicalContext(age=64), c)
    assert merged.age == 64 and merged.site == "back" and merged.conflicts


# ------------------------------------------------------------------ bad input


def test_nothing_recognisable(vocab):
    for text in ("Hello, I would like a second opinion please.", "asdf qwerty", "", "   "):
        res = parse_symptoms(text, vocab)
        assert res.context.not_understood == ("symptoms",) and res.context.empty


@pytest.mark.parametrize(
    "text",
    [
        (
            "Depuis trois mois j'ai une tache brune sur le dos de la main qui me gratte et "
            "saigne parfois. J'achète du pain et le médecin dit de revenir si elle change. "
        )
        * 40,
        "我的背上有一个黑色的痣，三个月前开始变大，有时候会痒，还会出血。" * 120,
        ("Seit drei Monaten habe ich einen braunen Fleck am Rücken, der juckt. ") * 60,
    ],
)
def test_another_language_fills_nothing_and_ends(vocab, text):
    text = text[:4000]
    t = time.perf_counter()
    res = parse_symptoms(text, vocab)
    assert time.perf_counter() - t < 30  # catastrophic backtracking, not speed
    assert res.context.not_understood == ("symptoms",) and res.context.empty


@pytest.mark.parametrize(
    "text",
    [
        "😀🔥 itchy 🩸 mole 👍🏽 on my 💪 arm",
        "itchy 痒 mole на спине",
        "\x00\x01 itchy \u202e",
        "?" * 4000,
        "1" * 4000,
        "not " * 1000,
        "no itching, " * 330,
        "İTCHY",
    ],
)
def test_odd_text_never_crashes_and_is_fast(vocab, text):
    t = time.perf_counter()
    res = parse_symptoms(text, vocab)
    assert time.perf_counter() - t < 30  # catastrophic backtracking, not speed
    assert isinstance(res, ParsedSymptoms) and isinstance(res.residual, str)


def test_emoji_text_still_parses(vocab):
    c = ctx("😀🔥 itchy 🩸 mole 👍🏽 on my 💪 arm", vocab)
    assert c.history == {"itch": True} and c.site == "arm"


def test_not_a_string(vocab):
    assert parse_symptoms(None, vocab).context.not_understood == ("symptoms",)  # type: ignore[arg-type]


def test_contradictions_are_left_unknown(vocab):
    c = ctx("itchy, not itchy", vocab)
    assert c.history == {} and c.conflicts and "itch" in c.conflicts[0]
    c = ctx("lesion on the face and on the arm", vocab)
    assert c.site is None and any(x.startswith("site") for x in c.conflicts)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("age 200", "age"),
        ("a 150-year-old man", "age"),
        ("Fitzpatrick type 9", "fitzpatrick"),
        ("skin type VII", "fitzpatrick"),
        ("lesion of 500 mm", "diameter_mm"),
        ("for 200 years", "duration_days"),
    ],
)
def test_out_of_range_numbers(vocab, text, field):
    c = ctx(text, vocab)
    assert getattr(c, field) is None
    assert any(n.startswith(f"{field}:") and "out of range" in n for n in c.not_understood)
