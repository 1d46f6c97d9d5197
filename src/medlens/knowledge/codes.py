"""Offline checks of the clinical codes in a knowledge pack.

* SNOMED CT concept ids: format, partition identifier and Verhoeff check digit.
* ICD-10-CM codes: existence and title, looked up in the CMS code tables shipped by
  the ``simple_icd_10_cm`` package (no network access).

>>> verhoeff_valid("36118008")
True
>>> icd10cm_title("J93.9")
'Pneumothorax, unspecified'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import simple_icd_10_cm as _icd

from medlens.errors import ConfigError

if TYPE_CHECKING:
    from medlens.knowledge import KnowledgePack
    from medlens.knowledge.schema import Domain

__all__ = [
    "check_pack",
    "icd10cm_exists",
    "icd10cm_title",
    "normalize_icd10cm",
    "snomed_valid",
    "verhoeff_valid",
]


# Verhoeff tables: multiplication in the dihedral group D5 (_D) and the position
# permutation (_P), one row per space-separated group of digits.
def _digit_table(rows: str) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(map(int, row)) for row in rows.split())


_D = _digit_table(
    "0123456789 1234067895 2340178956 3401289567 4012395678 "
    "5987604321 6598710432 7659821043 8765932104 9876543210"
)
_P = _digit_table(
    "0123456789 1576283094 5803796142 8916043527 9453126870 4286573901 2793806415 7046913258"
)


# Partition identifiers (2nd and 3rd digit from the right) of *concept* ids:
# "00" = core concept, "10" = concept in an extension namespace.
_CONCEPT_PARTITIONS = frozenset({"00", "10"})


def verhoeff_valid(s: str) -> bool:
    """True when the digit string ``s`` ends in a correct Verhoeff check digit."""
    if not s or not s.isascii() or not s.isdigit():
        return False
    c = 0
    for i, ch in enumerate(reversed(s)):
        c = _D[c][_P[i % 8][int(ch)]]
    return c == 0


def snomed_valid(sctid: str | int) -> bool:
    """True when ``sctid`` is a well-formed SNOMED CT *concept* id.

    Checks 6-18 digits without a leading zero, a concept partition identifier
    ("00" or "10") and the Verhoeff check digit. It does not prove the concept exists.
    """
    s = str(sctid).strip()
    if not (6 <= len(s) <= 18) or not s.isascii() or not s.isdigit() or s[0] == "0":
        return False
    return s[-3:-1] in _CONCEPT_PARTITIONS and verhoeff_valid(s)


def normalize_icd10cm(code: str) -> str:
    """Upper-case, strip and dot an ICD-10-CM code ("j939" -> "J93.9")."""
    c = code.strip().upper().replace(" ", "")
    if "." not in c and len(c) > 3:
        c = f"{c[:3]}.{c[3:]}"
    return c


def icd10cm_exists(code: str) -> bool:
    """True when ``code`` (with or without the dot) is an ICD-10-CM category or subcategory.

    Chapters and blocks ("J00-J06") are not codes and return False.
    """
    c = normalize_icd10cm(code)
    return bool(c) and _icd.is_valid_item(c) and _icd.is_category_or_subcategory(c)


def icd10cm_title(code: str) -> str:
    """Official CMS title of an ICD-10-CM code; ConfigError when the code does not exist."""
    if not icd10cm_exists(code):
        raise ConfigError(f"ICD-10-CM code {code!r} does not exist in the CMS code tables")
    return str(_icd.get_description(normalize_icd10cm(code)))


def check_pack(pack: KnowledgePack | Domain) -> list[str]:
    """Human-readable problems in a pack's codes, prompts and label maps (empty = OK)."""
    domain: Domain = getattr(pack, "domain", pack)  # accept a KnowledgePack or a Domain
    problems: list[str] = []
    where = domain.id
    if domain.task == "multi_label" and len(domain.reference_prompts) < 5:
        problems.append(f"{where}: multi_label pack needs >=5 reference_prompts")
    unlabelled = {
        (vocab, name.strip().casefold())
        for vocab, names in domain.unlabelled.items()
        for name in names
    }
    for f in domain.findings:
        at = f"{where}/{f.id}"
        for code in f.icd10:
            if not icd10cm_exists(code):
                problems.append(f"{at}: ICD-10-CM {code} does not exist")
        if f.snomed and not snomed_valid(f.snomed):
            problems.append(f"{at}: SNOMED CT id {f.snomed} fails the format/Verhoeff check")
        seen: set[str] = set()
        for prompt in f.prompts:
            key = prompt.strip().casefold()
            if key in seen:
                problems.append(f"{at}: duplicate prompt {prompt!r}")
            seen.add(key)
        for vocab, names in f.labels.items():
            for name in names:
                if (vocab, name.strip().casefold()) in unlabelled:
                    problems.append(f"{at}: label {vocab}:{name!r} is also declared unlabelled")
    return problems
