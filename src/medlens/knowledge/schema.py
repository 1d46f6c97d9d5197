"""Schema of a clinical knowledge pack (one YAML file per domain).

The packs are data: findings, their prompts, codes, risk and descriptions live in
YAML; this module only validates their shape. Code *validity* (ICD-10-CM existence,
SNOMED CT check digits) is checked by ``medlens.knowledge.codes`` and the tests.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Risk = Literal["urgent", "soon", "routine"]
RISK_ORDER: dict[str, int] = {"routine": 0, "soon": 1, "urgent": 2}

# First letter A-Z: ICD-10-CM uses chapter U for emergency codes (U07.1 COVID-19).
ICD10_FORMAT = re.compile(r"^[A-Z][0-9][0-9AB](\.[0-9A-TV-Z]{1,4})?$")
SNOMED_FORMAT = re.compile(r"^[1-9][0-9]{5,17}$")
# ``excludes`` entry meaning every other finding of the pack (e.g. "no finding").
ANY_OTHER_FINDING = "any_other_finding"


class Description(BaseModel):
    """A clinical description written in MedLens's own words, by section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    presentation: str = Field(min_length=20)
    history: str = Field(min_length=20, description="typical history and symptoms")
    image_features: str = Field(min_length=20, description="key features on the image")
    differentials: str = Field(min_length=10, description="main differential diagnoses")

    def sections(self) -> dict[str, str]:
        return self.model_dump()


class Finding(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9_]+$")
    name: str
    synonyms: tuple[str, ...] = ()
    description: Description
    prompts: tuple[str, ...] = Field(min_length=5)
    risk: Risk
    next_step: str = Field(min_length=10)
    icd10: tuple[str, ...] = Field(min_length=1)
    # One SNOMED CT concept specific to this finding; unique within the pack (a test
    # enforces it) unless ``synonym_of`` declares the finding another's synonym. Empty
    # when no specific concept is known: better no code than a wrong one.
    snomed: str = ""
    # Id of the finding this one is a synonym of (same concept, separate label/prompts).
    synonym_of: str | None = None
    # Multi-label packs: findings that cannot be present together with this one (ids, or
    # ``any_other_finding``). The scoring caps this finding's probability at
    # 1 − max(theirs) (``analysis.scoring.consistent``, docs/analysis.md).
    excludes: tuple[str, ...] = ()
    # dataset label vocabulary -> label names in that vocabulary that mean this finding
    labels: dict[str, tuple[str, ...]] = {}

    @field_validator("icd10")
    @classmethod
    def _icd10_format(cls, codes: tuple[str, ...]) -> tuple[str, ...]:
        for code in codes:
            if not ICD10_FORMAT.match(code):
                raise ValueError(f"ICD-10-CM code {code!r} is not well formed (e.g. C43.9)")
        return codes

    @field_validator("snomed")
    @classmethod
    def _snomed_format(cls, sctid: str) -> str:
        if sctid and not SNOMED_FORMAT.match(sctid):
            raise ValueError(f"SNOMED CT id {sctid!r} is not 6-18 digits")
        return sctid


class Concept(BaseModel):
    """A visual concept (a dermoscopic criterion, a radiographic sign) scored zero-shot
    by its prompts, as findings are; shown as "the image shows: ..." (issue 14)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9_]+$")
    name: str
    prompts: tuple[str, ...] = Field(min_length=3)


class DatasetCoding(BaseModel):
    """How one dataset codes a context field: its column and, for a value list, the
    dataset's codes for a yes/no answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str
    # yes/no items: the column's codes for "yes" (present) and "no" (absent)
    present: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()


class ContextTerm(BaseModel):
    """One value of a clinical-context field (a body site, a sex, a history item): the
    words a sentence names it by (the symptom parser) and each dataset's codes for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9_]+$")
    name: str
    words: tuple[str, ...] = ()
    # Body sites: the coarse region the fusion head encodes (sites of one group share it).
    group: str | None = None
    # dataset name -> its codes for this value (values), or its column coding (history)
    codes: dict[str, tuple[str, ...]] = {}
    coding: dict[str, DatasetCoding] = {}


class ContextVocabulary(BaseModel):
    """The clinical-context vocabulary of a domain (issue 15): what a user may state
    about the patient and lesion, and how each training dataset codes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sexes: tuple[ContextTerm, ...]
    body_sites: tuple[ContextTerm, ...]
    history: tuple[ContextTerm, ...]  # yes/no items: itch, grew, ...
    # Scalar fields -> dataset -> its column (age in years, Fitzpatrick 1-6, diameter mm).
    columns: dict[Literal["age", "sex", "site", "fitzpatrick", "diameter_mm"], dict[str, str]] = {}
    # Dataset codes that mean "not known" in any context column.
    unknown_codes: tuple[str, ...] = ("", "UNK", "unknown", "nan")

    @model_validator(mode="after")
    def _unique(self) -> ContextVocabulary:
        for what in ("sexes", "body_sites", "history"):
            ids = [t.id for t in getattr(self, what)]
            if len(ids) != len(set(ids)):
                raise ValueError(f"context {what} ids must be unique")
        if any(t.group is None for t in self.body_sites):
            raise ValueError("every context body site needs a group")
        return self

    def site_groups(self) -> tuple[str, ...]:
        """The coarse body-site groups, in first-mention order."""
        return tuple(dict.fromkeys(t.group for t in self.body_sites if t.group))


class DicomRule(BaseModel):
    """When a DICOM header alone names this domain (Modality, Body Part Examined)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modalities: tuple[str, ...] = ()  # e.g. CR, DX; upper case
    # Accepted BodyPartExamined values; empty = any. A missing tag is taken as the
    # domain's own body part only when ``body_part_default`` is true.
    body_parts: tuple[str, ...] = ()
    body_part_default: bool = False


class Domain(BaseModel):
    """One imaging domain: its findings and how they are scored, detected and triaged.

    A domain is a YAML file: adding one needs no code (see docs/architecture.md).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9_]+$")
    name: str
    # Position among the domains (detection scores, tables); ties keep discovery order.
    order: int = 100
    # Probability at which a finding of each risk level raises the triage, until a model
    # card ships per-finding thresholds chosen on validation for a target sensitivity.
    triage_thresholds: dict[Literal["urgent", "soon"], float] = {"urgent": 0.20, "soon": 0.35}
    dicom: DicomRule = DicomRule()
    # Datasets (``medlens.datasets`` names) whose train/val splits the default model is
    # trained and calibrated on.
    training_datasets: tuple[str, ...] = ()
    # More datasets of this domain the out-of-distribution reference is fitted on (their
    # train/val splits; ``medlens ood fit``): sources the model should admit although it
    # was not trained on them.
    ood_datasets: tuple[str, ...] = ()
    # single_label: softmax over findings (a differential); multi_label: per-finding sigmoid
    task: Literal["single_label", "multi_label"]
    # Phrases that describe an image of this domain at all (used for domain auto-detection).
    domain_prompts: tuple[str, ...] = Field(min_length=3)
    # Multi-label only: phrasings of "nothing abnormal" used as the reference for each finding.
    reference_prompts: tuple[str, ...] = ()
    # Flipped copies of the image whose embeddings are averaged with the original's for
    # scoring (test-time augmentation). Only for domains without a canonical orientation:
    # a flipped chest radiograph is a different anatomy.
    test_time_flips: tuple[Literal["horizontal", "vertical", "both"], ...] = ()
    # Whether ``analyze`` takes a dermoscopy image beside a clinical photo of the same
    # lesion: findings are then scored on a weighted mean of the two views' logits, the
    # weight fitted on validation pairs (Derm7pt) and kept in the fusion head.
    paired_dermoscopy: bool = False
    findings: tuple[Finding, ...]
    # dataset label vocabulary -> labels that carry no diagnosis (e.g. "todo", "Unknown")
    unlabelled: dict[str, tuple[str, ...]] = {}
    # Visual concepts scored zero-shot (uncalibrated) beside the findings; optional.
    concepts: tuple[Concept, ...] = ()
    # Clinical context a user may give with an image (age, site, history; issue 15).
    context: ContextVocabulary | None = None

    @model_validator(mode="after")
    def _reference_for_multi_label(self) -> Domain:
        if self.task == "multi_label" and not self.reference_prompts:
            raise ValueError(
                "a multi_label pack needs reference_prompts (the 'normal study' each "
                "finding is scored against)"
            )
        return self

    @model_validator(mode="after")
    def _synonyms_and_exclusions(self) -> Domain:
        ids = {f.id for f in self.findings}
        by_id = {f.id: f for f in self.findings}
        for f in self.findings:
            if f.synonym_of is not None:
                target = by_id.get(f.synonym_of)
                if target is None or target.id == f.id or target.synonym_of is not None:
                    raise ValueError(
                        f"{f.id}: synonym_of must name another finding that is not itself "
                        f"a synonym (got {f.synonym_of!r})"
                    )
            if not f.excludes:
                continue
            if self.task != "multi_label":
                raise ValueError(
                    f"{f.id}: excludes is for multi_label packs (a differential is exclusive)"
                )
            unknown = set(f.excludes) - ids - {ANY_OTHER_FINDING}
            if unknown or f.id in f.excludes:
                raise ValueError(f"{f.id}: excludes names unknown findings {sorted(unknown)}")
        # One projection step must settle every constraint: a finding that yields (has
        # ``excludes``) may not be what another finding excludes.
        yielding = {f.id for f in self.findings if f.excludes}
        for f in self.findings:
            if f.excludes and (hit := yielding & set(self.excluded_by(f.id)) - {f.id}):
                raise ValueError(
                    f"{f.id}: excludes {sorted(hit)}, which declare excludes themselves"
                )
        return self

    def excluded_by(self, finding_id: str) -> tuple[str, ...]:
        """The findings ``finding_id`` cannot co-occur with (its ``excludes``, expanded)."""
        f = next(f for f in self.findings if f.id == finding_id)
        if ANY_OTHER_FINDING in f.excludes:
            return tuple(g.id for g in self.findings if g.id != f.id)
        return f.excludes

    @field_validator("concepts")
    @classmethod
    def _unique_concepts(cls, concepts: tuple[Concept, ...]) -> tuple[Concept, ...]:
        ids = [c.id for c in concepts]
        if len(ids) != len(set(ids)):
            raise ValueError("concept ids must be unique")
        return concepts

    @field_validator("findings")
    @classmethod
    def _unique_ids(cls, findings: tuple[Finding, ...]) -> tuple[Finding, ...]:
        seen: set[str] = set()
        for f in findings:
            if f.id in seen:
                raise ValueError(f"finding id {f.id!r} appears twice")
            seen.add(f.id)
        return findings
