"""Free-text symptoms -> structured clinical context (issue 15, item 2).

"63-year-old man, itchy mole on the back for 3 months, no bleeding" becomes age 63,
sex male, site back, duration 91 days, itch yes, bleed no; the rest of the text
("mole") is handed to the text tower. What can be recognised (sexes, body sites,
history items and their words) is the knowledge pack's ``context:`` vocabulary; the
English grammar around it (negation, hedges, units, number words) is data in
``context_text.yaml``. No NLP library: medspaCy's ConText was tried and rejected
because on Python 3.11 it needs spaCy < 3.8, whose thinc pins numpy < 2
(docs/context_parser.md). The scoping here is NegEx-style:

* a negation ("no", "denies", "n't", "neither ... nor", "without") covers the items
  that follow it in the same clause, up to ``max_gap_words`` words before the first
  one and only list glue ("and", "or", ",") between items; ". ; ! ?", new lines and
  "but/however/although ..." end it; a comma ends it unless a list follows;
* a hedge ("not sure if", "maybe", "might", "?bleeding", "if it bleeds", "used to"),
  or a question, leaves the item **unknown**: unknown stays unknown, never "no";
* an item stated both ways ("itchy, not itchy") is left unknown and noted in
  ``conflicts``; so are two different sexes, sites, ages or Fitzpatrick types.

Numbers outside the plausible ranges of ``context.py`` are not filled and are listed
in ``not_understood``. Long text with almost no English function words is taken as
another language: nothing is filled from it (``not_understood == ("symptoms",)``).
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from itertools import islice
from typing import Any

from medlens import _yaml
from medlens.analysis.context import (
    AGE_RANGE,
    DIAMETER_RANGE_MM,
    DURATION_RANGE_DAYS,
    FITZPATRICK_RANGE,
    ClinicalContext,
)
from medlens.knowledge.schema import ContextVocabulary

__all__ = ["ParsedSymptoms", "parse_symptoms"]

_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4, "v": 5, "vi": 6, "vii": 7, "viii": 8}
_NUM = r"\d{1,4}(?:[.,]\d+)?"
_DETERMINER = re.compile(r"\b(?:my|his|her|their|your|a|an|its|one)\b")
_LOOKBACK = 80  # characters searched back for the words that go with a mention
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?|\d+")


@dataclass(frozen=True)
class ParsedSymptoms:
    """What the parser understood in a symptom text, and what is left of the text.

    ``context.parsed`` lists the filled fields ("age", "history.bleed") so a wrong parse
    is visible to the user; ``residual`` is the text without those mentions, so the text
    tower does not count them a second time."""

    context: ClinicalContext
    residual: str


# ------------------------------------------------------------------ grammar and patterns


@cache
def _grammar() -> dict[str, Any]:
    text = resources.files("medlens.analysis").joinpath("context_text.yaml").read_text("utf-8")
    return _yaml.safe_load(text)


def _phrase(p: str, *, flexible: bool = False, unit: bool = False) -> str:
    """Regex for a phrase on word boundaries; words may be split by spaces or hyphens.
    ``flexible``: "the" also matches my/his/her/a, and left/right may precede a word
    ("back of my left hand" is the vocabulary's "back of the hand"). ``unit``: may follow
    a digit directly ("6mm", "63M")."""
    parts = p.lower().split()
    pieces = []
    for i, w in enumerate(parts):
        if flexible and w == "the":
            pieces.append(r"(?:the|my|his|her|their|your|a|an|its|one)")
        elif flexible and i > 0:
            pieces.append(r"(?:(?:left|right)[\s-]+)?" + re.escape(w))
        else:
            pieces.append(re.escape(w))
    body = r"[\s-]+".join(pieces)
    lead = "" if p.startswith("n'") or not p[0].isalnum() else r"(?<![\w'])"
    if unit and lead:
        lead = r"(?<![^\W\d_])"
    tail = r"(?!\w)" if p[-1].isalnum() else ""
    return lead + body + tail


def _alternation(phrases: Iterable[str], *, flexible: bool = False, unit: bool = False) -> str:
    uniq = sorted({p.lower() for p in phrases if p.strip()}, key=len, reverse=True)
    if not uniq:
        return r"(?!x)x"
    # Grouped by first character behind a lookahead: re tries every branch at every
    # position, and ~200 branches on 4,000 characters would cost ~100 ms.
    groups: dict[str, list[str]] = {}
    for p in uniq:
        groups.setdefault(p[0], []).append(_phrase(p, flexible=flexible, unit=unit))
    return (
        "(?:"
        + "|".join(f"(?={re.escape(c)})(?:{'|'.join(alts)})" for c, alts in groups.items())
        + ")"
    )


@dataclass
class _Patterns:
    """Every regex of one vocabulary (built once per vocabulary object)."""

    triggers: re.Pattern[str]
    trigger_kind: dict[str, str]
    targets: re.Pattern[str]
    target_of: dict[str, tuple[str, bool | None]]  # lowered phrase -> (item, fixed value)
    not_mentions: re.Pattern[str]
    post: re.Pattern[str]
    sites: re.Pattern[str]
    site_of: dict[str, str]
    sexes: re.Pattern[str]
    sex_of: dict[str, str]
    ages: tuple[re.Pattern[str], ...]
    diameter: re.Pattern[str]
    fitzpatrick: re.Pattern[str]
    duration: re.Pattern[str]
    duration_phrase: re.Pattern[str]
    vague_duration: re.Pattern[str]
    leads: dict[str, re.Pattern[str]] = field(default_factory=dict)


def _key(s: str) -> str:
    return " ".join(re.split(r"[\s-]+", s.lower().strip()))


def _is_word(code: str, vocab: ContextVocabulary) -> bool:
    """A dataset code that is also an English word ("flat", "palpable"): usable as text."""
    low = code.lower()
    return (
        code.isalpha()
        and low not in {"true", "false", "yes", "no", "y", "n"}
        and (code not in vocab.unknown_codes and low not in vocab.unknown_codes)
    )


def _build(vocab: ContextVocabulary) -> _Patterns:
    g = _grammar()
    kinds: dict[str, str] = {}
    for kind, key in (
        ("neg", "negation_pre"),
        ("hedge", "hedge_pre"),
        ("pseudo", "pseudo"),
        ("stop", "terminators"),
    ):
        for p in g[key]:
            kinds.setdefault(_key(str(p)), kind)
    trig_alts = [_phrase(p) for p in sorted(kinds, key=len, reverse=True) if p != "?"]
    trig_alts.append(r"\?(?=\w)")  # "?bleeding": a clinician's query
    triggers = re.compile("|".join(trig_alts))

    target_of: dict[str, tuple[str, bool | None]] = {}
    for term in vocab.history:
        for w in (term.id, *term.words):
            target_of.setdefault(_key(w), (term.id, None))
        for c in term.coding.values():
            for code in c.present:
                if _is_word(code, vocab):
                    target_of.setdefault(_key(code), (term.id, None))
            for code in c.absent:
                if _is_word(code, vocab):
                    target_of.setdefault(_key(code), (term.id, False))
        for w in term.words:
            if " " in w or not w.isalpha():
                continue
            for pre in g["negating_prefixes"]:
                target_of.setdefault(_key(f"{pre}{w}"), (term.id, False))
            for suf in g["negating_suffixes"]:
                target_of.setdefault(_key(f"{w}{suf}"), (term.id, False))
    post_neg = _alternation(str(x) for x in g["negation_post"])
    post_aff = "|".join(
        re.escape(str(x)) if not str(x).isalnum() else _phrase(str(x))
        for x in g["affirmation_post"]
    )
    post = re.compile(
        rf"\s*(?:[:=\-–]\s*)?(?:(?P<no>{post_neg})|(?P<yes>{post_aff}))"
        r"\s*(?=$|[,.;!)\n])"
    )

    site_of = {_key(w): t.id for t in vocab.body_sites for w in (t.id, t.name, *t.words)}
    sex_of = {_key(w): t.id for t in vocab.sexes for w in (t.id, t.name, *t.words)}

    units_age = _alternation(g["age_units"], unit=True)
    before = _alternation(g["age_before"])
    dur_units = _alternation(g["duration_units"], unit=True)
    len_units = _alternation(g["length_units"], unit=True)
    shorthand = _alternation(g["sex_shorthand"], unit=True)
    not_unit = rf"(?![\d.,]*\d)(?!\s*(?:{dur_units}|{len_units}|%))"
    ages = (
        re.compile(
            rf"(?<![\w.])(?P<n>{_NUM})\s*-?\s*(?P<u>{units_age})[\s-]*"
            rf"{_alternation(g['age_after'])}"
        ),
        re.compile(
            rf"(?<![\w.])(?P<n>{_NUM})\s*{_alternation(g['age_suffix'], unit=True)}"
            rf"(?:\s*(?P<s>{shorthand}))?"
        ),
        re.compile(rf"{before}\s*[:=]?\s*(?P<n>\d{{1,4}}){not_unit}"),
        re.compile(rf"(?<![\w.])(?P<n>\d{{1,3}})\s?(?P<s>{shorthand})(?!\w)"),
    )
    diameter = re.compile(
        rf"(?<![\w.])(?P<n>{_NUM})(?:\s*(?:x|×|by|\*)\s*(?P<n2>{_NUM}))?\s*(?P<u>{len_units})"
    )
    fitz = re.compile(
        rf"{_alternation(g['fitzpatrick_lead'])}\s*[:=-]?\s*(?:type\s*)?"
        r"(?P<v>viii|vii|vi|iv|v|iii|ii|i|\d{1,2})(?!\w)(?!\.\d)"
    )
    numbers = _alternation(str(k) for k in g["number_words"])
    duration = re.compile(
        rf"(?<![\w.])(?P<n>{_NUM}|{numbers})(?P<h1>\s+and\s+a\s+half)?"
        rf"\s*-?\s*(?P<u>{dur_units})(?P<h2>\s+and\s+a\s+half)?"
    )
    vague = re.compile(
        rf"{_alternation(g['vague_duration_lead'])}\s+(?:days|weeks|months|years|ages)(?!\w)"
    )
    leads = {
        "site": re.compile(rf"(?:{_alternation(g['site_lead'])}\s+)+$"),
        "duration": re.compile(rf"(?:{_alternation(g['duration_lead'])}\s+)+$"),
        "other": re.compile(r"(?:(?<![\w'])(?:a|an|the)\s+)+$"),
    }
    return _Patterns(
        triggers=triggers,
        trigger_kind=kinds,
        targets=re.compile(_alternation(target_of)),
        target_of=target_of,
        not_mentions=re.compile(_alternation(g["not_mentions"])),
        post=post,
        sites=re.compile(_alternation(site_of, flexible=True)),
        site_of=site_of,
        sexes=re.compile(_alternation(sex_of)),
        sex_of=sex_of,
        ages=ages,
        diameter=diameter,
        fitzpatrick=fitz,
        duration=duration,
        duration_phrase=re.compile(_alternation(g["duration_phrases"])),
        vague_duration=vague,
        leads=leads,
    )


_CACHE: dict[int, tuple[ContextVocabulary, _Patterns]] = {}


def _patterns(vocab: ContextVocabulary) -> _Patterns:
    hit = _CACHE.get(id(vocab))
    if hit is None or hit[0] is not vocab:
        hit = (vocab, _build(vocab))
        _CACHE[id(vocab)] = hit
    return hit[1]


# ------------------------------------------------------------------ the parser


@dataclass
class _State:
    """The work of one parse: lowered text, the character spans already used up."""

    low: str
    used: list[bool]
    removed: list[tuple[int, int]] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    parsed: list[str] = field(default_factory=list)
    not_understood: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    def free(self, a: int, b: int) -> bool:
        return not any(self.used[a:b])

    def take(self, a: int, b: int, lead: re.Pattern[str] | None = None) -> None:
        for i in range(a, b):
            self.used[i] = True
        if lead is not None and (m := lead.search(self.low, max(0, a - _LOOKBACK), a)):
            a = m.start()
        self.removed.append((a, b))

    def put(self, name: str, value: Any) -> None:
        self.values[name] = value
        self.parsed.append(name)


def _lower(text: str) -> str:
    """Lower case without changing the length (offsets stay valid): "İ".lower() is 2 chars."""
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def _normalise(text: object) -> str:
    if not isinstance(text, str):
        return ""
    text = unicodedata.normalize("NFKC", text)
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")


def _foreign(low: str) -> bool:
    """Long text with (almost) no English function words: another language."""
    g = _grammar()
    words = re.findall(r"[^\W\d_]+(?:'[^\W\d_]+)?", low)
    if len(words) < int(g["foreign_min_words"]):
        return False
    english = set(g["english_words"])
    share = sum(w in english for w in words) / len(words)
    return share < float(g["foreign_max_share"])


def _in_range(st: _State, name: str, x: float, lo: float, hi: float, shown: str) -> bool:
    if lo <= x <= hi:
        return True
    note = f"{name}: {shown} is out of range ({lo:g}-{hi:g})"
    if note not in st.not_understood:
        st.not_understood.append(note)
    return False


def _one(st: _State, name: str, found: list[Any], show: str = "{}") -> None:
    """Fill ``name`` when all mentions agree; otherwise leave it unknown and say why."""
    distinct = list(dict.fromkeys(found))
    if len(distinct) == 1:
        st.put(name, distinct[0])
    elif len(distinct) > 1:
        st.conflicts.append(
            f"{name}: the text says " + " and ".join(show.format(v) for v in distinct)
        )


def _fitzpatrick(st: _State, p: _Patterns) -> None:
    found = []
    for m in p.fitzpatrick.finditer(st.low):
        v = m["v"]
        n = _ROMAN[v] if v in _ROMAN else int(v)
        st.take(m.start(), m.end(), p.leads["other"])
        if _in_range(st, "fitzpatrick", n, *FITZPATRICK_RANGE, v.upper()):
            found.append(n)
    _one(st, "fitzpatrick", found)


def _age(st: _State, p: _Patterns, sex_found: list[str]) -> None:
    g = _grammar()
    found: list[float] = []
    for pat in p.ages:
        for m in pat.finditer(st.low):
            if not st.free(m.start(), m.end()):
                continue
            n = float(m["n"].replace(",", "."))
            unit = m.groupdict().get("u")
            age = n * float(g["age_units"][_key(unit)]) if unit else n
            st.take(m.start(), m.end(), p.leads["other"])
            if m.groupdict().get("s"):
                sex_found.append(g["sex_shorthand"][m["s"]])
            if _in_range(st, "age", age, *AGE_RANGE, f"{n:g}"):
                found.append(round(age, 2))
    _one(st, "age", found, "{:g}")


def _diameter(st: _State, p: _Patterns) -> None:
    g = _grammar()
    found: list[float] = []
    for m in p.diameter.finditer(st.low):
        if not st.free(m.start(), m.end()):
            continue
        n = max(float(m["n"].replace(",", ".")), float((m["n2"] or "0").replace(",", ".")))
        mm = round(n * float(g["length_units"][_key(m["u"])]), 3)
        st.take(m.start(), m.end(), p.leads["other"])
        if _in_range(st, "diameter_mm", mm, *DIAMETER_RANGE_MM, f"{mm:g} mm"):
            found.append(mm)
    if found:  # "grew from 4 mm to 6 mm": the largest is the lesion now
        st.put("diameter_mm", max(found))


def _duration(st: _State, p: _Patterns) -> None:
    g = _grammar()
    numbers = {_key(str(k)): float(v) for k, v in g["number_words"].items()}
    not_after = re.compile(rf"{_alternation(g['duration_not_after'])}\s*$")
    found: list[float] = []
    for m in p.duration_phrase.finditer(st.low):
        if st.free(m.start(), m.end()):
            found.append(float(g["duration_phrases"][_key(m.group())]))
            st.take(m.start(), m.end(), p.leads["duration"])
    for m in p.duration.finditer(st.low):
        if not st.free(m.start(), m.end()) or not_after.search(
            st.low, max(0, m.start() - _LOOKBACK), m.start()
        ):
            continue
        raw = _key(m["n"])
        n = numbers[raw] if raw in numbers else float(raw.replace(",", "."))
        if m["h1"] or m["h2"]:
            n += 0.5
        days = n * float(g["duration_units"][_key(m["u"])])
        st.take(m.start(), m.end(), p.leads["duration"])
        if _in_range(st, "duration_days", days, *DURATION_RANGE_DAYS, f"{m.group().strip()}"):
            found.append(round(days, 2))
    if found:  # the lesion is at least as old as its oldest stated symptom
        st.put("duration_days", max(found))
    else:
        for m in p.vague_duration.finditer(st.low):
            if st.free(m.start(), m.end()):
                st.not_understood.append(f"duration: {m.group()!r} gives no number (left unknown)")
                break


def _site(st: _State, p: _Patterns) -> None:
    g = _grammar()
    not_after = re.compile(rf"(?:{_alternation(g['site_not_after'])})\s+$")
    not_before = re.compile(rf"\s+(?:{_alternation(g['site_not_before'])})")
    of_next = re.compile(r"\s+of\s+(?:(?:the|my|his|her|their|your|a|an|left|right)\s+)*")
    hits = [m for m in p.sites.finditer(st.low) if st.free(m.start(), m.end())]
    positions = {str(x) for x in g["site_positions"]}
    keep: list[re.Match[str]] = []
    skip: set[int] = set()
    for i, m in enumerate(hits):
        if i in skip:
            continue
        back = max(0, m.start() - _LOOKBACK)
        if not_after.search(st.low, back, m.start()) or not_before.match(st.low, m.end()):
            continue
        nxt = hits[i + 1] if i + 1 < len(hits) else None
        rel = of_next.match(st.low, m.end())
        if nxt is not None and rel is not None and rel.end() == nxt.start():
            if _key(m.group()) in positions:  # "back of the neck": the neck
                lead = p.leads["site"].search(st.low, back, m.start())
                st.removed.append((lead.start() if lead else m.start(), m.end()))
                continue
            skip.add(i + 1)  # "sole of the foot": the sole
            st.removed.append((m.end(), nxt.end()))
        keep.append(m)
    words = [re.sub(r"(?:left|right)[\s-]+", "", _key(m.group())) for m in keep]
    ids = []
    for w, m in zip(words, keep, strict=True):
        sid = p.site_of.get(w) or p.site_of.get(_DETERMINER.sub("the", w))
        if sid is not None:
            ids.append(sid)
            st.take(m.start(), m.end(), p.leads["site"])
    _one(st, "site", ids)


def _sex(st: _State, p: _Patterns, shorthand: list[str]) -> None:
    g = _grammar()
    pronouns = {str(x) for x in g["pronouns"]}
    strong: list[tuple[str, re.Match[str]]] = []
    weak: list[tuple[str, re.Match[str]]] = []
    for m in p.sexes.finditer(st.low):
        if not st.free(m.start(), m.end()):
            continue
        w = _key(m.group())
        (weak if w in pronouns else strong).append((p.sex_of[w], m))
    found = list(shorthand) + [s for s, _ in strong]
    used = strong
    if not found:
        first = set(g["first_person"])
        if not any(w in first for w in _WORD.findall(st.low)):
            found, used = [s for s, _ in weak], []  # pronouns stay in the residual text
    _one(st, "sex", found)
    if "sex" in st.values:
        for _, m in used:
            st.take(m.start(), m.end(), p.leads["other"])


@dataclass
class _Event:
    start: int
    end: int
    kind: str  # neg hedge pseudo stop comma target
    item: str = ""
    fixed: bool | None = None


def _history(st: _State, p: _Patterns) -> None:
    """NegEx-style scoping of the history items (see the module docstring)."""
    g = _grammar()
    low = st.low
    glue = {str(x) for x in g["list_glue"]}
    joiners = {str(x) for x in g["list_joiners"]}
    max_gap = int(g["max_gap_words"])
    blocked = [(m.start(), m.end()) for m in p.not_mentions.finditer(low)]
    events: list[_Event] = []
    for m in p.targets.finditer(low):
        a, b = m.start(), m.end()
        if any(x < b and a < y for x, y in blocked) or not st.free(a, b):
            continue
        item, fixed = p.target_of[_key(m.group())]
        events.append(_Event(a, b, "target", item, fixed))
    taken = [(e.start, e.end) for e in events]
    for m in p.triggers.finditer(low):
        if any(x < m.end() and m.start() < y for x, y in taken):
            continue
        kind = "hedge" if m.group() == "?" else p.trigger_kind[_key(m.group())]
        events.append(_Event(m.start(), m.end(), kind))
    for m in re.finditer(r"[.;!\n]|\?(?!\w)|,|\s[-–]\s", low):
        if m.group() == "." and re.match(r"\d", low[m.end() : m.end() + 1]):
            continue  # a decimal point
        events.append(_Event(m.start(), m.end(), "comma" if m.group() == "," else "stop"))
    events.sort(key=lambda e: (e.start, -e.end))

    # Which clauses are questions ("is it growing?"): their items stay unknown.
    stops = [(m.start(), m.group()) for m in re.finditer(r"[.;!\n]|\?(?!\w)", low)]

    def is_question(pos: int) -> bool:
        k = bisect.bisect_left(stops, (pos, ""))
        return k < len(stops) and stops[k][1] == "?"

    def words(a: int, b: int) -> list[str]:
        return _WORD.findall(low[a:b])

    results: list[tuple[str, bool | None, _Event, _Event | None]] = []
    state: str | None = None
    trigger: _Event | None = None
    seen = False
    prev_end = 0
    for i, ev in enumerate(events):
        if state is not None:
            gap = words(prev_end, ev.start)
            if (not seen and len(gap) > max_gap) or (seen and any(w not in glue for w in gap)):
                state, trigger = None, None
        if ev.kind == "stop":
            state, trigger = None, None
        elif ev.kind == "comma":
            if state is not None and not (seen and _list_follows(events, i, low, glue, joiners)):
                state, trigger = None, None
        elif ev.kind in ("neg", "hedge"):
            if state != "hedge":
                state, trigger, seen = ev.kind, ev, False
        elif ev.kind == "target":
            value: bool | None = True
            if ev.fixed is not None:
                value = ev.fixed
            if state == "neg":
                value = not value
            elif state == "hedge":
                value = None
            post = p.post.match(low, ev.end)
            if post is not None and state is None:
                value = ev.fixed is not False if post["yes"] else ev.fixed is True
                st.take(post.start(), post.end())
            if is_question(ev.start):
                value = None
            results.append((ev.item, value, ev, trigger if state == "neg" else None))
            seen = True
        prev_end = max(prev_end, ev.end)

    by_item: dict[str, set[bool]] = {}
    for item, value, _, _ in results:
        if value is not None:
            by_item.setdefault(item, set()).add(value)
    hist: dict[str, bool] = {}
    for t in p.target_of.values():
        item = t[0]
        vals = by_item.get(item)
        if not vals or item in hist or f"history.{item}" in st.parsed:
            continue
        if len(vals) == 1:
            hist[item] = next(iter(vals))
            st.parsed.append(f"history.{item}")
        else:
            note = f"history.{item}: the text says both yes and no"
            if note not in st.conflicts:
                st.conflicts.append(note)
    for item, value, ev, trig in results:
        if value is not None and item in hist:
            st.take(ev.start, ev.end)
            if trig is not None:
                st.take(trig.start, trig.end)
    st.values["history"] = hist


def _list_follows(
    events: list[_Event], i: int, low: str, glue: set[str], joiners: set[str]
) -> bool:
    """After a comma in a negated list: is the next thing another item, and does the
    clause join its items with and/or/nor ("no itching, bleeding or pain")?"""
    nxt = next((e for e in islice(events, i + 1, None) if e.kind != "pseudo"), None)
    if nxt is None or nxt.kind != "target":
        return False
    if any(w not in glue for w in _WORD.findall(low[events[i].end : nxt.start])):
        return False
    end = next((e.start for e in islice(events, i + 1, None) if e.kind == "stop"), len(low))
    return any(w in joiners for w in _WORD.findall(low[events[i].end : end]))


def _residual(text: str, removed: list[tuple[int, int]], low: str) -> str:
    """``text`` without the recognised spans; list glue left between them goes too."""
    g = _grammar()
    glue = {str(x) for x in g["list_glue"]} | {"with", "but"}
    spans = sorted(removed)
    merged: list[list[int]] = []
    for a, b in spans:
        if merged:
            gap = low[merged[-1][1] : a]
            only_glue = all(w in glue for w in _WORD.findall(gap))
            if a <= merged[-1][1] or (only_glue and not any(c in gap for c in ".;\n")):
                merged[-1][1] = max(merged[-1][1], b)
                continue
        merged.append([a, b])
    out, pos = [], 0
    for a, b in merged:
        out.append(text[pos:a])
        out.append(" ")
        pos = b
    out.append(text[pos:])
    s = "".join(out)
    s = re.sub(r"[ \t]+", " ", s)
    s = re.sub(r"\s+([,.;:!?])(?!\w)", r"\1", s)
    s = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", s)
    s = re.sub(r"(^|[.;!?]\s*)[,;:]\s*", r"\1", s)
    s = re.sub(r"\b(?:and|or|with|but|nor)\s*([.;!?]|$)", r"\1", s)
    s = re.sub(r"^\W+|[\s,;:]+$", "", s)
    s = re.sub(r"(^|[.;!?]\s+)(?:and|or|with|but|nor)\b[\s,]*", r"\1", s)
    return s.strip(" ,;:")


def parse_symptoms(text: str, vocab: ContextVocabulary) -> ParsedSymptoms:
    """The clinical context a free-text symptom description states.

    Never raises: text that is not a string, empty, in another language or naming
    nothing the vocabulary knows gives an empty context with ``not_understood ==
    ("symptoms",)``; impossible numbers are listed in ``not_understood`` and left out;
    contradictions are listed in ``conflicts`` and left unknown."""
    norm = _normalise(text)
    low = _lower(norm)
    nothing = ParsedSymptoms(ClinicalContext(not_understood=("symptoms",)), norm.strip())
    if not norm.strip() or _foreign(low):
        return nothing
    p = _patterns(vocab)
    st = _State(low=low, used=[False] * len(low))
    shorthand: list[str] = []
    _fitzpatrick(st, p)
    _age(st, p, shorthand)
    _diameter(st, p)
    _duration(st, p)
    _site(st, p)
    _sex(st, p, shorthand)
    _history(st, p)
    order = ["age", "sex", "site", "fitzpatrick", "diameter_mm", "duration_days"]
    fields: Mapping[str, Any] = {k: st.values[k] for k in order if k in st.values}
    parsed = tuple(f for f in order if f in st.parsed) + tuple(
        sorted(f for f in st.parsed if f.startswith("history."))
    )
    if not parsed and not st.not_understood and not st.conflicts and not _mentions(st, p):
        return nothing
    ctx = ClinicalContext(
        **fields,
        history=st.values.get("history", {}),
        parsed=parsed,
        not_understood=tuple(st.not_understood),
        conflicts=tuple(st.conflicts),
    )
    return ParsedSymptoms(ctx, _residual(norm, st.removed, low))


def _mentions(st: _State, p: _Patterns) -> bool:
    """Whether the text names any history item at all (even hedged): then it is not
    "nothing recognisable", just nothing certain."""
    return p.targets.search(st.low) is not None
