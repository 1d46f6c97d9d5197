"""Knowledge packs: shape, clinical codes (checked offline) and dataset label mapping."""

from __future__ import annotations

import re

import pytest

from medlens.errors import ConfigError
from medlens.knowledge import KnowledgePack, domains, load_domain
from medlens.knowledge.codes import (
    check_pack,
    icd10cm_exists,
    icd10cm_title,
    normalize_icd10cm,
    snomed_valid,
    verhoeff_valid,
)
from medlens.knowledge.schema import RISK_ORDER

# Words that carry no clinical meaning when matching an ICD-10-CM title to a finding.
STOP_WORDS = frozenset(
    {
        *("a", "an", "and", "are", "as", "at", "by", "due", "for", "from", "in", "is"),
        *("not", "of", "on", "or", "the", "to", "with", "without"),
        *("other", "unspecified", "specified", "elsewhere", "classified", "nec", "nos"),
        *("type", "part", "site", "encounter", "initial", "subsequent", "sequela"),
        *("acute", "chronic", "disease", "diseases", "disorder", "disorders"),
        *("condition", "conditions", "abnormal", "finding", "findings"),
    }
)

# Finding ids other modules rely on.
CHEST_IDS = (
    *("atelectasis", "cardiomegaly", "pleural_effusion", "infiltration", "mass", "nodule"),
    *("pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis"),
    *("pleural_thickening", "hernia", "covid19_pneumonia", "tuberculosis", "ards"),
    "no_finding",
)


def _stems(text: str) -> set[str]:
    """Lower-cased word stems (first 5 characters), stop words and 1-letter words removed."""
    words = re.findall(r"[a-z0-9]+", text.casefold())
    return {w[:5] for w in words if w not in STOP_WORDS and len(w) > 1}


@pytest.fixture(params=domains())
def pack(request: pytest.FixtureRequest) -> KnowledgePack:
    return load_domain(request.param)


def _report(offenders: list[str], what: str) -> str:
    msg = f"{len(offenders)} {what}:\n  " + "\n  ".join(offenders)
    if offenders:
        print(msg)
    return msg


# --- every pack ---------------------------------------------------------------------


@pytest.mark.parametrize("domain_id", domains())
def test_pack_loads(domain_id: str) -> None:
    p = load_domain(domain_id)
    assert p.id == domain_id
    assert p.findings, f"{domain_id}: no findings"
    assert len(p.domain.domain_prompts) >= 3
    if p.task == "multi_label":
        assert len(p.domain.reference_prompts) >= 5


def test_finding_ids_unique(pack: KnowledgePack) -> None:
    ids = pack.finding_ids
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, _report(dupes, f"duplicate finding ids in {pack.id}")


def test_every_finding_is_complete(pack: KnowledgePack) -> None:
    offenders: list[str] = []
    for f in pack.findings:
        if len(f.prompts) < 5:
            offenders.append(f"{f.id}: {len(f.prompts)} prompts (< 5)")
        for section, text in f.description.sections().items():
            if not text.strip():
                offenders.append(f"{f.id}: empty description section {section!r}")
        if f.risk not in RISK_ORDER:
            offenders.append(f"{f.id}: risk {f.risk!r}")
        if not f.next_step.strip():
            offenders.append(f"{f.id}: no next step")
        if len({p.strip().casefold() for p in f.prompts}) != len(f.prompts):
            offenders.append(f"{f.id}: duplicate prompts")
    assert not offenders, _report(offenders, f"incomplete findings in {pack.id}")


def test_icd10cm_codes_exist(pack: KnowledgePack) -> None:
    offenders = [
        f"{f.id}: {code}" for f in pack.findings for code in f.icd10 if not icd10cm_exists(code)
    ]
    assert not offenders, _report(offenders, f"unknown ICD-10-CM codes in {pack.id}")


def test_first_icd10cm_title_fits_finding(pack: KnowledgePack) -> None:
    """Cheap honesty check: the first code's CMS title shares a word stem with the finding."""
    offenders: list[str] = []
    for f in pack.findings:
        code = f.icd10[0]
        if not icd10cm_exists(code):
            continue  # reported by test_icd10cm_codes_exist
        title = icd10cm_title(code)
        ours = _stems(" ".join([f.name, *f.synonyms, f.description.presentation]))
        if not _stems(title) & ours:
            offenders.append(f"{f.id} ({f.name}): {code} {title!r}")
    assert not offenders, _report(offenders, f"ICD-10-CM titles that do not fit in {pack.id}")


def test_snomed_ids_valid(pack: KnowledgePack) -> None:
    offenders = [
        f"{f.id}: {f.snomed}" for f in pack.findings if f.snomed and not snomed_valid(f.snomed)
    ]
    assert not offenders, _report(offenders, f"invalid SNOMED CT ids in {pack.id}")


# Top-level or broad concepts that name no particular finding (issue 13: 95320005 stood
# for five different skin findings).
GENERIC_SNOMED = {
    "95320005": "Disorder of skin",
    "64572001": "Disease",
    "404684003": "Clinical finding",
    "55342001": "Neoplastic disease",
    "19829001": "Disorder of lung",
    "301256004": "Pleura finding",
    "118953000": "Bone finding",
}


def _concept(pack: KnowledgePack, fid: str) -> str:
    """The finding a code belongs to: itself, or what it declares itself a synonym of."""
    return pack.finding(fid).synonym_of or fid


def test_snomed_codes_are_specific_and_unique(pack: KnowledgePack) -> None:
    """Each SNOMED CT concept stands for one finding (or its declared synonyms), and no
    finding carries a generic concept. Empty = no verified specific concept yet."""
    owner: dict[str, str] = {}
    offenders: list[str] = []
    for f in pack.findings:
        if not f.snomed:
            continue
        if f.snomed in GENERIC_SNOMED:
            offenders.append(f"{f.id}: generic concept {f.snomed} {GENERIC_SNOMED[f.snomed]}")
        first = owner.setdefault(f.snomed, f.id)
        if _concept(pack, first) != _concept(pack, f.id):
            offenders.append(f"{f.id}: SNOMED CT {f.snomed} is also {first}'s")
    assert not offenders, _report(offenders, f"non-specific SNOMED CT codes in {pack.id}")


RESIDUAL_ICD10 = re.compile(r"\b(other|unspecified|nonspecific)\b", re.IGNORECASE)


def test_shared_icd10cm_codes_are_residual_categories(pack: KnowledgePack) -> None:
    """ICD-10-CM is a statistical classification: its residual codes ("Other
    nonspecific abnormal finding of lung field", R91.8) group several findings by
    design, so those may be shared. A specific code may belong to one finding only
    (synonyms excepted)."""
    users: dict[str, set[str]] = {}
    for f in pack.findings:
        for code in f.icd10:
            users.setdefault(code, set()).add(_concept(pack, f.id))
    offenders = [
        f"{code} ({icd10cm_title(code)}): {sorted(fids)}"
        for code, fids in users.items()
        if len(fids) > 1 and not RESIDUAL_ICD10.search(icd10cm_title(code))
    ]
    assert not offenders, _report(offenders, f"specific ICD-10-CM codes shared in {pack.id}")


def _finding(fid: str, **extra: object) -> dict:
    return {
        "id": fid,
        "name": fid,
        "description": {k: "x" * 20 for k in ("presentation", "history", "image_features")}
        | {"differentials": "x" * 10},
        "prompts": [f"{fid} {i}" for i in range(5)],
        "risk": "routine",
        "next_step": "see a clinician",
        "icd10": ["R91.8"],
        **extra,
    }


def _domain(task: str, *findings: dict) -> dict:
    return {
        "id": "t",
        "name": "t",
        "task": task,
        "domain_prompts": ["a", "b", "c"],
        "reference_prompts": ["normal"] if task == "multi_label" else [],
        "findings": list(findings),
    }


def test_synonym_of_and_excludes_are_validated() -> None:
    from pydantic import ValidationError

    from medlens.knowledge.schema import Domain

    ok = Domain.model_validate(
        _domain(
            "multi_label",
            _finding("a", snomed="36118008"),
            _finding("b", snomed="36118008", synonym_of="a"),
            _finding("normal", excludes=["any_other_finding"]),
        )
    )
    assert ok.excluded_by("normal") == ("a", "b")
    bad = [
        _domain("multi_label", _finding("a", synonym_of="zz")),
        _domain("multi_label", _finding("a", synonym_of="a")),
        _domain(
            "multi_label",
            _finding("a"),
            _finding("b", synonym_of="a"),
            _finding("c", synonym_of="b"),
        ),
        _domain("single_label", _finding("a"), _finding("b", excludes=["a"])),
        _domain("multi_label", _finding("a"), _finding("b", excludes=["zz"])),
        _domain("multi_label", _finding("a", excludes=["b"]), _finding("b", excludes=["a"])),
    ]
    for raw in bad:
        with pytest.raises(ValidationError):
            Domain.model_validate(raw)


def test_no_finding_excludes_every_abnormal_finding() -> None:
    cxr = load_domain("chest_xray")
    nf = cxr.finding_ids.index("no_finding")
    assert cxr.exclusions == ((nf, tuple(i for i in range(len(cxr.findings)) if i != nf)),)


def test_check_pack_clean(pack: KnowledgePack) -> None:
    problems = check_pack(pack)
    assert problems == [], _report(problems, f"problems in {pack.id}")


def test_label_mapping_is_case_insensitive(pack: KnowledgePack) -> None:
    mapped = 0
    for f in pack.findings:
        for vocab, names in f.labels.items():
            for name in names:
                for variant in (name, name.upper(), name.lower(), f"  {name} "):
                    assert pack.map_label(vocab, variant) == f.id, (vocab, variant)
                assert pack.knows_label(vocab, name.swapcase())
                mapped += 1
    for vocab, names in pack.domain.unlabelled.items():
        for name in names:
            assert pack.map_label(vocab, name.upper()) is None
    assert mapped > 0, f"{pack.id}: no dataset labels mapped"


def test_unknown_label_raises(pack: KnowledgePack) -> None:
    vocab = next((v for f in pack.findings for v in f.labels), "none")
    with pytest.raises(ConfigError):
        pack.map_label(vocab, "certainly-not-a-real-label")
    with pytest.raises(ConfigError):
        pack.map_label("no_such_vocabulary", "whatever")
    assert not pack.knows_label(vocab, "certainly-not-a-real-label")


# --- chest X-ray pack ---------------------------------------------------------------


def test_chest_pack_contents() -> None:
    cxr = load_domain("chest_xray")
    assert cxr.task == "multi_label"
    assert set(CHEST_IDS) <= set(cxr.finding_ids)
    assert len(cxr.domain.domain_prompts) >= 5
    assert len(cxr.domain.reference_prompts) >= 5
    for fid in (
        "pneumothorax",
        "pneumonia",
        "covid19_pneumonia",
        "tuberculosis",
        "mass",
        "nodule",
        "ards",
        "edema",
    ):
        assert cxr.finding(fid).risk == "urgent", fid
    assert cxr.finding("no_finding").risk == "routine"


@pytest.mark.parametrize(
    ("vocab", "label", "expected"),
    [
        ("nih_cxr14", "Effusion", "pleural_effusion"),
        ("nih_cxr14", "pleural_thickening", "pleural_thickening"),
        ("nih_cxr14", "NO FINDING", "no_finding"),
        ("pneumoniamnist", "Normal", "no_finding"),
        ("pneumoniamnist", "PNEUMONIA", "pneumonia"),
        ("covid_chestxray", "covid-19", "covid19_pneumonia"),
        ("covid_chestxray", "ards", "ards"),
        ("covid_chestxray", "Pneumocystis", "pneumonia"),
        ("covid_chestxray", "TODO", None),
        ("covid_chestxray", "unknown", None),
        ("tbx11k", "TB", "tuberculosis"),
        ("tbx11k", "Healthy", "no_finding"),
        ("chexpert", "pleural effusion", "pleural_effusion"),
    ],
)
def test_chest_label_examples(vocab: str, label: str, expected: str | None) -> None:
    assert load_domain("chest_xray").map_label(vocab, label) == expected


# --- code checks ----------------------------------------------------------------------


REAL_SCTIDS = ("36118008", "60046008", "233604007", "840539006", "882784691000119100")


@pytest.mark.parametrize("sctid", REAL_SCTIDS)
def test_verhoeff_rejects_any_one_digit_change(sctid: str) -> None:
    assert verhoeff_valid(sctid) and snomed_valid(sctid) and snomed_valid(int(sctid))
    for i, original in enumerate(sctid):
        for d in "0123456789":
            if d != original:
                changed = sctid[:i] + d + sctid[i + 1 :]
                assert not verhoeff_valid(changed), changed


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "12345",
        "1234567890123456789",
        "0036118008",
        "36118O08",
        "36 118008",
        "36118018",
        "3772571013",
    ],  # last: a real *description* id (partition 01), Verhoeff-valid
)
def test_snomed_valid_rejects_malformed(bad: str) -> None:
    assert not snomed_valid(bad)


def test_icd10cm_lookup() -> None:
    assert icd10cm_exists("J93.9") and icd10cm_exists("J939") and icd10cm_exists(" j93.9 ")
    assert icd10cm_title("J939") == icd10cm_title("J93.9") == "Pneumothorax, unspecified"
    assert normalize_icd10cm("s229xxa") == "S22.9XXA"
    assert icd10cm_exists("U07.1")
    for made_up in ("J99.99", "Q99.99", "J18.99", "ZZZ", "J00-J06", "10", ""):
        assert not icd10cm_exists(made_up), made_up
    with pytest.raises(ConfigError):
        icd10cm_title("J99.99")


def test_the_c_yaml_loader_reads_every_shipped_file_as_the_python_one_does() -> None:
    """medlens._yaml parses with libyaml when PyYAML has it (a cold-start cost, issue 17);
    every YAML file in the package must come out exactly as yaml.safe_load reads it."""
    from pathlib import Path

    import yaml

    import medlens
    from medlens import _yaml

    files = sorted(Path(medlens.__file__).parent.rglob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        text = f.read_text("utf-8")
        assert _yaml.safe_load(text) == yaml.safe_load(text), f
