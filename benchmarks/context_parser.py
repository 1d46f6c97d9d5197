"""How well does the free-text symptom parser (analysis/context_text.py) fill the
clinical context? Per-field precision, recall and F1 over hand-written sentences.

Usage: python benchmarks/context_parser.py [--sets tests/data/symptom_sentences.yaml ...]
           [--out docs/context_parser.md] [--json benchmarks/results/context_parser.json]

A field of one sentence is a true positive when the parser fills it with the expected
value (a duration within 10 %, an age within 0.5 years, a diameter within 0.05 mm),
a false positive when it fills it with anything else, and a false negative when the
sentence states it and the parser does not get it right (a wrong value counts as both).
History items are scored as fields of their own ("history.bleed"): "no" is a value,
and filling an item that the sentence leaves unknown (a hedge) is a false positive.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SETS = (
    ROOT / "tests/data/symptom_sentences.yaml",
    ROOT / "tests/data/symptom_sentences_heldout.yaml",
)
SCALARS = ("age", "sex", "site", "fitzpatrick", "diameter_mm", "duration_days")
TOLERANCE = {"age": (0.5, 0.0), "diameter_mm": (0.05, 0.0), "duration_days": (0.0, 0.10)}


def load_set(path: Path) -> list[dict[str, Any]]:
    """The sentences of one YAML set: ``[{text, expect}]``."""
    return list(yaml.safe_load(path.read_text("utf-8")))


def flat(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """``{age: 63, history: {itch: true}}`` -> ``{age: 63, history.itch: True}``."""
    out = {k: ctx[k] for k in SCALARS if ctx.get(k) is not None}
    out.update({f"history.{k}": v for k, v in (ctx.get("history") or {}).items()})
    return out


def same(field: str, got: Any, want: Any) -> bool:
    if field in TOLERANCE:
        absolute, relative = TOLERANCE[field]
        return abs(float(got) - float(want)) <= max(absolute, relative * abs(float(want)))
    return got == want


def fields_of(vocab: Any) -> list[str]:
    return [*SCALARS, *(f"history.{t.id}" for t in vocab.history)]


def score(sentences: Sequence[Mapping[str, Any]], vocab: Any) -> dict[str, Any]:
    """Per-field and overall (micro) precision/recall/F1 of ``parse_symptoms``; the
    sentences it got wrong; the parse time per sentence."""
    from medlens.analysis.context_text import parse_symptoms

    parse_symptoms("warm-up: compiles the vocabulary's patterns", vocab)
    counts = {f: {"tp": 0, "fp": 0, "fn": 0} for f in fields_of(vocab)}
    errors, times = [], []
    for s in sentences:
        t = time.perf_counter()
        got = flat(parse_symptoms(s["text"], vocab).context.model_dump())
        times.append(time.perf_counter() - t)
        want = flat(s.get("expect") or {})
        wrong = []
        for f in counts:
            g, w = got.get(f), want.get(f)
            if g is not None and w is not None and same(f, g, w):
                counts[f]["tp"] += 1
                continue
            if g is not None:
                counts[f]["fp"] += 1
            if w is not None:
                counts[f]["fn"] += 1
            if g is not None or w is not None:
                wrong.append(f"{f}: got {g!r}, expected {w!r}")
        if wrong:
            errors.append({"text": s["text"], "wrong": wrong})

    def prf(c: Mapping[str, int]) -> dict[str, float | int]:
        p = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else float("nan")
        r = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else float("nan")
        f1 = 2 * p * r / (p + r) if p + r and p == p and r == r else float("nan")
        return {**c, "support": c["tp"] + c["fn"], "precision": p, "recall": r, "f1": f1}

    total = {k: sum(c[k] for c in counts.values()) for k in ("tp", "fp", "fn")}
    return {
        "n": len(sentences),
        "fields": {f: prf(c) for f, c in counts.items()},
        "overall": prf(total),
        "errors": errors,
        "ms_per_sentence": 1000 * statistics.mean(times) if times else float("nan"),
    }


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"


def table(result: Mapping[str, Any]) -> str:
    rows = [
        "| field | support | TP | FP | FN | precision | recall | F1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f, r in [*result["fields"].items(), ("**all fields (micro)**", result["overall"])]:
        rows.append(
            f"| {f} | {r['support']} | {r['tp']} | {r['fp']} | {r['fn']} | "
            f"{_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['f1'])} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="*", type=Path, default=list(DEFAULT_SETS))
    ap.add_argument("--out", type=Path, default=ROOT / "docs/context_parser.md")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/context_parser.json")
    args = ap.parse_args(argv)

    from medlens.knowledge import load_domain

    vocab = load_domain("dermatology").domain.context
    results = {p.name: score(load_set(p), vocab) for p in args.sets if p.exists()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str) + "\n", "utf-8")
    parts = [DOC_HEAD]
    for name, res in results.items():
        kind = (
            "held-out set: written after the parser was frozen, never tuned on"
            if "heldout" in name
            else "development set: written alongside the parser, so optimistic"
        )
        parts += [
            f"## `tests/data/{name}` ({res['n']} sentences; {kind})",
            "",
            table(res),
            "",
            f"Mean parse time {res['ms_per_sentence']:.2f} ms per sentence "
            "(one CPU core, patterns already compiled).",
            "",
        ]
        if res["errors"]:
            parts += [
                "<details><summary>Sentences with a wrong or missing field "
                f"({len(res['errors'])})</summary>",
                "",
            ]
            parts += [f"- {e['text']!r}: " + "; ".join(e["wrong"]) for e in res["errors"]]
            parts += ["", "</details>", ""]
    parts.append(DOC_TAIL)
    args.out.write_text("\n".join(parts), "utf-8")
    print(args.out.read_text("utf-8"))
    return 0


DOC_HEAD = """# Free-text symptoms -> clinical context: the parser and how well it does

`medlens.analysis.context_text.parse_symptoms(text, vocab)` turns a symptom description
into a `ClinicalContext` (age, sex, body site, Fitzpatrick type, diameter, duration and
the history items itch / grew / hurt / changed / bleed / elevation) plus the residual
text for the text tower. Made by:

    .venv/bin/python benchmarks/context_parser.py

(writes this file and `benchmarks/results/context_parser.json`).

**Library: none — a NegEx-style rule parser written here.** medspaCy's ConText was the
first choice (issue 15). It installs from PyPI (54 s, 31 packages,
~283 MB in a fresh venv) and runs on a blank spaCy `English()` pipeline, but on Python
3.11 medspaCy 1.3.1 requires `spacy<3.8`, whose `thinc` 8.2 requires `numpy<2`: in the
MedLens venv `pip install medspacy` would downgrade numpy 2.4 to 1.26 under torch,
scikit-learn, scipy and pandas. It also pulls Cython, nltk and QuickUMLS that the
parser would not use. The scoping rules below are the ones ConText/NegEx use.

What it recognises comes from the knowledge pack (`context:` in
`knowledge/dermatology.yaml`: sexes, body sites and history items with their `words`,
plus the dataset codings that are words, e.g. derm7pt's `flat` = not raised); the
English grammar around it (negation and hedge triggers, scope terminators, number words,
units) is data in `src/medlens/analysis/context_text.yaml`. Conventions:

* negation ("no", "denies", "n't", "neither … nor", "without", "painless", "non-tender",
  "bleeding: no") covers the items after it in its clause: at most 5 words before the
  first item, only list glue (and / or / nor / ",") between items; ". ; ! ?", a new
  line and "but / however / although …" end it; a comma ends it unless a list joined by
  and/or/nor follows ("no itching, bleeding or pain");
* hedged, hypothetical or past-only statements ("not sure if it grew", "maybe",
  "might", "?bleeding", "if it bleeds", "used to") and questions leave the item
  **unknown** — never "no". "I think it grew" counts as yes (every report is what the
  patient thinks);
* an item stated both ways ("itchy, not itchy"), two sexes, sites, ages or Fitzpatrick
  types: left unknown, noted in `conflicts`;
* durations: year = 365.25 days, month = 30.44, week = 7; "a few" = 3, "a couple" = 2;
  "for years" / "several weeks" without a number stay unknown (noted in
  `not_understood`); several durations -> the longest (the lesion is at least as old
  as its oldest symptom); "yesterday" / "last week / month / year" = 1 / 7 / 30.44 /
  365.25 days;
* diameter: mm or cm, "6 x 4 mm" -> 6 mm, several -> the largest;
* he / she / his / her count for sex only when the text is not in the first person and
  they agree; clinician shorthand "63M", "45 yo F" is read;
* numbers outside `context.py`'s ranges (age 200, Fitzpatrick 7) are not filled and are
  listed in `not_understood`; long text with almost no English function words (another
  language) fills nothing (`not_understood == ("symptoms",)`).

Scoring: a field is right when the value matches (duration within 10 %, age within
0.5 years, diameter within 0.05 mm); a wrong value is a false positive and a false
negative; filling a field the sentence leaves unknown (e.g. a hedged item) is a false
positive.
"""

DOC_TAIL = """## Limits

* English only; no spelling correction ("itchey" is not recognised).
* A site or symptom the pack's vocabulary lacks is not recognised ("toenail",
  "widened", "shoulder" is an arm); add words to the pack, not to the code.
* One site per lesion: a text naming two different sites leaves the site unknown.
* Scope is by words, not syntax: "no bleeding, itchy" is read correctly only because a
  comma without a following and/or/nor list ends the negation; unusual word orders can
  still scope wrongly. Temporal nuance ("bled once but has not since") becomes a conflict.
* Ages written as "woman, 38", "Female, 29" or "a man of 40" are not read (a bare
  number is too ambiguous); "in his 50s" is left unknown.
* Only the word forms the pack lists are read: the held-out set's "burns" is missed
  while the pack has "burning"; "in the past month" (no number) gives no duration.
* Relative times describe the symptom, not always the lesion: "it bled last month"
  fills a duration of 30 days.
"""

if __name__ == "__main__":
    sys.exit(main())
