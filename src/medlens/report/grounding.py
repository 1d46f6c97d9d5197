"""The grounding check: prose about a report may state only what the report states.

A rewrite of the template narrative (by a language model, or by a person) is accepted
only when every finding, code, number, laterality and triage level it names is in the
structured report, and when it still names the findings of the impression and the
triage level. ``grounded_narrative`` returns the rewrite when it passes and otherwise
the template narrative, with the reasons it was rejected.

What counts as a finding: every name and synonym of every finding in the knowledge
packs (so "melanoma" in a report of a naevus is caught even though the report never
mentions melanoma). Longer terms are matched first and masked, so "COVID-19
pneumonia" does not also count as "pneumonia"; all-capital abbreviations (BCC, SLE)
match case-sensitively.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from medlens.knowledge import domains, load_domain
from medlens.report.model import Report

__all__ = ["Grounded", "check_grounding", "grounded_narrative"]

ICD10_TOKEN = re.compile(r"\b[A-Z][0-9][0-9AB](?:\.[0-9A-Z]{1,4})?\b")
SNOMED_TOKEN = re.compile(r"(?<![\w.])[1-9][0-9]{5,17}(?![\w.])")
NUMBER_TOKEN = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)?(?:\s?%| percent)?(?!\w)")
LATERALITY = re.compile(
    r"\b(left|right|bilateral(?:ly)?|unilateral(?:ly)?|both (?:lungs|sides)|"
    r"left-sided|right-sided|ipsilateral|contralateral)\b",
    re.IGNORECASE,
)
LEVELS = ("urgent", "soon", "routine")
TRIAGE_PHRASE = re.compile(
    r"\btriage(?:\s+level)?(?:\s+is|\s+of|:)?\s+(urgent|soon|routine)\b"
    r"|\b(urgent|soon|routine)\s+triage\b",
    re.IGNORECASE,
)


@lru_cache(maxsize=8)
def _terms(pack_ids: tuple[str, ...]) -> tuple[tuple[re.Pattern[str], str], ...]:
    """(pattern, finding id) for every finding name and synonym, longest first."""
    pairs: list[tuple[str, str]] = []
    for d in pack_ids:
        for f in load_domain(d).findings:
            pairs += [(t, f.id) for t in (f.name, *f.synonyms) if t.strip()]
    pairs.sort(key=lambda p: len(p[0]), reverse=True)
    out = []
    for term, fid in pairs:
        flags = 0 if (term.isupper() and len(term) <= 5) else re.IGNORECASE
        out.append((re.compile(rf"(?<!\w){re.escape(term)}(?!\w)", flags), fid))
    return tuple(out)


def findings_named(text: str) -> set[str]:
    """Ids of the pack findings a text names (by name or synonym)."""
    masked, found = text, set()
    for pattern, fid in _terms(domains()):
        for m in list(pattern.finditer(masked)):
            found.add(fid)
            masked = masked[: m.start()] + " " * (m.end() - m.start()) + masked[m.end() :]
    return found


def _number(token: str) -> str:
    """A canonical form: "92 %" / "92 percent" / "92%" → "92%"; "0,92" → "0.92"."""
    t = token.replace(",", ".").replace(" percent", "%").replace(" %", "%").strip()
    return t


def _allowed_numbers(report: Report) -> set[str]:
    allowed = {_number(m.group()) for m in NUMBER_TOKEN.finditer(report.narrative_text)}
    for f in report.findings:
        p = f.probability
        allowed |= {f"{p:.0%}", f"{p:.1%}", f"{p:.2f}", f"{p:.3f}", f"{p:.4f}".rstrip("0")}
    return allowed


def check_grounding(text: str, report: Report) -> list[str]:
    """Why ``text`` is not grounded in ``report`` (empty = grounded)."""
    problems: list[str] = []
    reported = {f.id for f in report.findings}
    names = {f.id: f.name for f in report.findings}
    named = findings_named(text)
    for fid in sorted(named - reported):
        problems.append(f"names a finding the report does not contain: {fid}")
    for fid in report.impression.top_findings:
        if fid not in named:
            problems.append(f"omits a finding of the impression: {names.get(fid, fid)}")

    codes = {c for f in report.findings for c in f.icd10}
    for code in sorted(set(ICD10_TOKEN.findall(text)) - codes):
        problems.append(f"names a code the report does not contain: {code}")
    snomeds = {f.snomed for f in report.findings}
    allowed = _allowed_numbers(report)
    for token in sorted(set(SNOMED_TOKEN.findall(text)) - snomeds - allowed):
        problems.append(f"names a code the report does not contain: {token}")
    for m in NUMBER_TOKEN.finditer(text):
        n = _number(m.group())
        if n not in allowed and n not in snomeds:
            problems.append(f"states a number the report does not: {m.group().strip()}")

    source = report.narrative_text
    for m in LATERALITY.finditer(text):
        if not re.search(rf"\b{re.escape(m.group())}\b", source, re.IGNORECASE):
            problems.append(f"states a laterality the report does not: {m.group()}")

    level = report.impression.triage_level
    said = {lv for lv in LEVELS if re.search(rf"\b{lv}\b", text, re.IGNORECASE)}
    stated = [(m.group(1) or m.group(2)).lower() for m in TRIAGE_PHRASE.finditer(text)]
    if level not in stated:
        problems.append(f"does not state the triage level ({level}) as the triage")
    for lv in sorted(set(stated) - {level}):
        problems.append(f"states triage {lv}; the report's triage is {level}")
    # Level words the template itself uses (e.g. a next step "... soon") are its own
    # words, not a claim; a changed triage is caught above as a stated triage.
    in_source = {lv for lv in LEVELS if re.search(rf"\b{lv}\b", source, re.IGNORECASE)}
    risks = {f.risk for f in report.findings} | {level} | in_source
    for lv in sorted(said - risks):
        problems.append(f"states a triage or risk level the report does not: {lv}")
    return problems


@dataclass(frozen=True)
class Grounded:
    text: str
    source: str  # "rewrite" or "template"
    rejected_because: tuple[str, ...] = ()


def grounded_narrative(report: Report, rewrite: str | None) -> Grounded:
    """The rewrite when it is grounded, else the template narrative and why."""
    if rewrite is None or not rewrite.strip():
        return Grounded(report.narrative_text, "template", ("no rewrite",))
    problems = check_grounding(rewrite, report)
    if problems:
        return Grounded(report.narrative_text, "template", tuple(problems))
    return Grounded(rewrite.strip(), "rewrite")
