"""The clinical context of one lesion: who the patient is and what they report.

One type for the CLI, the Python API, the service and the UI (issue 15). Every field is
optional and *unknown stays unknown*: a history item the user did not answer is absent
from ``history``, never "no", and contributes nothing to the fusion (``fusion.encode``).
Vocabularies (body sites, sexes, history items) and each dataset's coding of them are
data in the knowledge pack (``context:``); this module only validates and maps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from medlens.errors import ConfigError, InvalidContext
from medlens.knowledge.schema import ContextTerm, ContextVocabulary

# Plausible ranges: outside them a value is a typing error, not a patient.
AGE_RANGE = (0.0, 120.0)
DIAMETER_RANGE_MM = (0.1, 300.0)
DURATION_RANGE_DAYS = (0.0, 120 * 365.25)
FITZPATRICK_RANGE = (1, 6)
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4, "v": 5, "vi": 6}
_YES = {"yes", "y", "true", "1"}
_NO = {"no", "n", "false", "0"}


class ClinicalContext(BaseModel):
    """What is known about the patient and the lesion besides the image.

    ``history`` maps a history item of the pack (itch, grew, hurt, changed, bleed,
    elevation) to True/False; an item that is absent is unknown. ``parsed`` lists the
    fields filled from the free-text symptoms (shown back so a wrong parse is visible);
    ``not_understood`` the inputs that were recognised as nothing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    age: float | None = Field(default=None, description="years")
    sex: str | None = Field(default=None, description="a sex id of the pack (female, male)")
    site: str | None = Field(default=None, description="a body-site id of the pack")
    fitzpatrick: int | None = Field(default=None, description="Fitzpatrick skin type 1-6")
    diameter_mm: float | None = Field(default=None, description="lesion diameter, mm")
    duration_days: float | None = Field(default=None, description="how long it has been there")
    history: dict[str, bool] = Field(default_factory=dict, description="item -> yes/no")
    parsed: tuple[str, ...] = Field(default=(), description="fields filled from the text")
    not_understood: tuple[str, ...] = Field(default=(), description="inputs recognised as nothing")
    conflicts: tuple[str, ...] = Field(default=(), description="text that contradicted a field")

    def given(self) -> list[str]:
        """The fields that carry a value (history items as ``history.<item>``)."""
        out = [
            f
            for f in ("age", "sex", "site", "fitzpatrick", "diameter_mm", "duration_days")
            if getattr(self, f) is not None
        ]
        return out + [f"history.{k}" for k in sorted(self.history)]

    @property
    def empty(self) -> bool:
        return not self.given()


FORM_FIELDS = ("age", "sex", "site", "fitzpatrick", "diameter_mm", "duration_days", "history")
"""The user-facing context fields, in the order every surface lists them."""


def _blank(v: Any) -> bool:
    """None, whitespace, or an empty collection: "not given"."""
    if isinstance(v, str):
        return not v.strip()
    return v is None or (isinstance(v, Mapping | list | tuple | set) and not v)


def given_fields(**values: Any) -> dict[str, Any] | None:
    """The context fields that were filled in (CLI options, form fields); blanks are
    "not given" (HTML forms send every field). None when none was: the analysis is then
    exactly the one without context. Validation is ``build_context``'s job."""
    unknown = set(values) - set(FORM_FIELDS)
    if unknown:
        raise InvalidContext(f"unknown context field(s): {', '.join(sorted(unknown))}")
    out = {k: v.strip() if isinstance(v, str) else v for k, v in values.items() if not _blank(v)}
    return out or None


def describe_field(field: str, values: Mapping[str, Any]) -> str:
    """One field of a result's ``context.values`` as text: ``history.grew`` -> ``grew: yes``."""
    if field.startswith("history."):
        item = field.split(".", 1)[1]
        answer = values.get("history", {}).get(item)
        return f"{item}: {'yes' if answer else 'no' if answer is not None else '?'}"
    return f"{field.replace('_', ' ')}: {values.get(field, '?')}"


def _term(terms: Iterable[ContextTerm], value: str) -> ContextTerm | None:
    v = " ".join(value.strip().lower().replace("_", " ").split())
    for t in terms:
        if v in {t.id.replace("_", " "), t.name.lower(), *(w.lower() for w in t.words)}:
            return t
    return None


def _number(value: Any, what: str, lo: float, hi: float, unit: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InvalidContext(
            f"{what} must be a number ({unit.strip('()')}), not {str(value)[:40]!r}"
        ) from None
    if not math.isfinite(x) or not lo <= x <= hi:
        raise InvalidContext(f"{what} must be between {lo:g} and {hi:g} {unit}; got {x:g}")
    return x


def parse_history(items: str | Iterable[str] | None, vocab: ContextVocabulary) -> dict[str, bool]:
    """``"grew,bleed,no-itch"`` (or a list of such words) -> {grew: True, bleed: True,
    itch: False}. Unknown items and an item given both ways are clear errors."""
    if items is None:
        return {}
    words = items.split(",") if isinstance(items, str) else list(items)
    out: dict[str, bool] = {}
    for raw in words:
        w = raw.strip().lower()
        if not w:
            continue
        value = True
        for prefix in ("no-", "no ", "not-", "not ", "!"):
            if w.startswith(prefix):
                w, value = w[len(prefix) :].strip(), False
                break
        term = _term(vocab.history, w)
        if term is None:
            choices = ", ".join(t.id for t in vocab.history)
            raise InvalidContext(
                f"unknown history item {raw.strip()[:40]!r}; use {choices} (prefix no- for 'no')"
            )
        if out.get(term.id, value) != value:
            raise InvalidContext(f"history item {term.id!r} is given both as yes and as no")
        out[term.id] = value
    return out


def build_context(
    vocab: ContextVocabulary,
    *,
    age: Any = None,
    sex: str | None = None,
    site: str | None = None,
    fitzpatrick: Any = None,
    diameter_mm: Any = None,
    duration_days: Any = None,
    history: str | Iterable[str] | Mapping[str, bool] | None = None,
) -> ClinicalContext:
    """A validated context from user-facing values (CLI options, form fields, JSON).

    Clear errors for impossible values (an age of -3 or 200, a Fitzpatrick type 9);
    a body site or sex the pack does not know is an error that lists the choices.
    Empty strings mean "not given" (HTML forms send every field).
    """

    out: dict[str, Any] = {}
    if not _blank(age):
        out["age"] = _number(age, "age", *AGE_RANGE, "years")
    if not _blank(sex):
        t = _term(vocab.sexes, str(sex))
        if t is None and len(str(sex).strip()) == 1:  # "F" / "M" as forms abbreviate
            t = next((s for s in vocab.sexes if s.id[0] == str(sex).strip().lower()), None)
        if t is None:
            raise InvalidContext(
                f"unknown sex {str(sex)[:40]!r}; use {', '.join(s.id for s in vocab.sexes)} "
                "or leave it out"
            )
        out["sex"] = t.id
    if not _blank(site):
        t = _term(vocab.body_sites, str(site))
        if t is None:
            raise InvalidContext(
                f"unknown body site {str(site)[:40]!r}; use one of "
                f"{', '.join(s.id for s in vocab.body_sites)}"
            )
        out["site"] = t.id
    if not _blank(fitzpatrick):
        f = str(fitzpatrick).strip().lower().removeprefix("type").strip()
        value = _ROMAN.get(f, f)
        out["fitzpatrick"] = int(
            _number(value, "Fitzpatrick type", *FITZPATRICK_RANGE, "(types I-VI)")
        )
        if float(value) != out["fitzpatrick"]:
            raise InvalidContext("Fitzpatrick type must be a whole number from 1 to 6")
    if not _blank(diameter_mm):
        out["diameter_mm"] = _number(diameter_mm, "lesion diameter", *DIAMETER_RANGE_MM, "mm")
    if not _blank(duration_days):
        out["duration_days"] = _number(duration_days, "duration", *DURATION_RANGE_DAYS, "days")
    if isinstance(history, Mapping):
        hist = {}
        for k, v in history.items():
            term = _term(vocab.history, str(k))
            if term is None:
                raise InvalidContext(f"unknown history item {str(k)[:40]!r}")
            hist[term.id] = _answer(v, term.id)
        out["history"] = hist
    else:
        out["history"] = parse_history(history, vocab)
    return ClinicalContext(**out)


def _answer(v: Any, item: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in _YES:
        return True
    if s in _NO:
        return False
    raise InvalidContext(f"history item {item!r} must be yes or no, not {str(v)[:20]!r}")


def merge_parsed(given: ClinicalContext, parsed: ClinicalContext) -> ClinicalContext:
    """``given`` (explicit fields) completed by ``parsed`` (from the symptom text).

    An explicit field always wins; where the text says otherwise the disagreement is
    recorded in ``conflicts`` (never silently resolved by the text)."""
    data = given.model_dump()
    filled: list[str] = []
    conflicts = list(given.conflicts)
    for f in ("age", "sex", "site", "fitzpatrick", "diameter_mm", "duration_days"):
        p = getattr(parsed, f)
        if p is None:
            continue
        if data[f] is None:
            data[f] = p
            filled.append(f)
        elif data[f] != p:
            conflicts.append(f"{f}: given {data[f]!r}, the text says {p!r}")
    hist = dict(given.history)
    for k, v in parsed.history.items():
        if k not in hist:
            hist[k] = v
            filled.append(f"history.{k}")
        elif hist[k] != v:
            conflicts.append(
                f"history.{k}: given {'yes' if hist[k] else 'no'}, the text says "
                f"{'yes' if v else 'no'}"
            )
    data.update(
        history=hist,
        parsed=tuple(dict.fromkeys((*given.parsed, *filled))),
        not_understood=tuple(dict.fromkeys((*given.not_understood, *parsed.not_understood))),
        conflicts=tuple(conflicts),
    )
    return ClinicalContext(**data)


# ------------------------------------------------------------------ dataset codings


def _known(value: Any, vocab: ContextVocabulary) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return None if s in vocab.unknown_codes or s.lower() in vocab.unknown_codes else s


def from_record(meta: Mapping[str, Any], dataset: str, vocab: ContextVocabulary) -> ClinicalContext:
    """The context a dataset record states, mapped through the pack's codings; values a
    dataset does not code, or codes as unknown, stay unknown. Out-of-range values in a
    dataset (none seen in the shipped sets) are dropped rather than raised."""
    cols = {f: by_ds[dataset] for f, by_ds in vocab.columns.items() if dataset in by_ds}
    out: dict[str, Any] = {}
    if (v := _known(meta.get(cols.get("age", "")), vocab)) is not None:
        out["age"] = float(v)
    if (v := _known(meta.get(cols.get("sex", "")), vocab)) is not None:
        out["sex"] = next((t.id for t in vocab.sexes if v in t.codes.get(dataset, ())), None)
    if (v := _known(meta.get(cols.get("site", "")), vocab)) is not None:
        out["site"] = next((t.id for t in vocab.body_sites if v in t.codes.get(dataset, ())), None)
    if (v := _known(meta.get(cols.get("fitzpatrick", "")), vocab)) is not None:
        out["fitzpatrick"] = round(float(v))
    if (v := _known(meta.get(cols.get("diameter_mm", "")), vocab)) is not None:
        out["diameter_mm"] = float(v)
    hist = {}
    for t in vocab.history:
        c = t.coding.get(dataset)
        if c is None:
            continue
        v = _known(meta.get(c.column), vocab)
        if v in c.present:
            hist[t.id] = True
        elif v in c.absent:
            hist[t.id] = False
    out["history"] = hist
    lo, hi = AGE_RANGE
    if "age" in out and not (math.isfinite(out["age"]) and lo <= out["age"] <= hi):
        del out["age"]
    if "fitzpatrick" in out and not 1 <= out["fitzpatrick"] <= 6:
        del out["fitzpatrick"]
    if (
        "diameter_mm" in out
        and not DIAMETER_RANGE_MM[0] <= out["diameter_mm"] <= DIAMETER_RANGE_MM[1]
    ):
        del out["diameter_mm"]
    return ClinicalContext(**{k: v for k, v in out.items() if v is not None})


def vocabulary(pack: Any) -> ContextVocabulary:
    """The pack's context vocabulary, or a clear error for a domain without one."""
    vocab = pack.domain.context
    if vocab is None:
        raise ConfigError(
            f"the {pack.id} domain takes no clinical context (its knowledge pack declares none)"
        )
    return vocab
