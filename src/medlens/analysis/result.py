"""The analysis result: one pydantic model whose JSON is the documented output.

``MedLens.analyze`` returns an ``Analysis``; ``to_dict()`` (= ``model_dump(mode="json")``)
is the JSON of ``medlens analyze --json`` and ``POST /v1/analyze``, whose response model
it is, so ``/openapi.json`` carries the same schema. docs/analysis.md describes every
field, and tests/test_schema_doc.py checks that the two list the same fields.

Python callers keep attribute access (``result.triage.level``) and, on the JSON objects,
item access (``result.findings[0]["name"]``). ``result.findings`` holds every finding of
the domain; the JSON lists the top-k. The image embedding (``result.embedding``) is
available to Python callers and never part of the JSON.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_serializer,
)

from medlens.analysis.triage import Triage
from medlens.io.types import StudyContext
from medlens.knowledge.schema import Description, Risk

SCHEMA_VERSION = "1"
DISCLAIMER = (
    "Research software for decision support only; not a diagnosis. "
    "A qualified clinician must interpret every result."
)

__all__ = [
    "DISCLAIMER",
    "SCHEMA_VERSION",
    "Analysis",
    "DomainDetection",
    "FindingDescription",
    "FindingRow",
    "InputInfo",
    "KnowledgePassage",
    "ModelInfo",
    "OodCheck",
    "QualityInfo",
    "SimilarCase",
    "SymptomMatch",
    "SymptomSummary",
    "Triage",
]


class _Json(BaseModel):
    """A JSON object of the analysis. Unknown keys are refused so the JSON cannot grow a
    field the schema and docs/analysis.md do not know; every field is always present."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


class _Part(_Json):
    def __getitem__(self, key: str) -> Any:
        """``row["name"]``: item access as on the dicts these objects used to be."""
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)


class DomainDetection(_Part):
    """How the knowledge pack was chosen."""

    source: Literal["given", "dicom", "image"]
    scores: dict[str, float] = Field(description="zero-shot domain probabilities")


class OodCheck(_Part):
    """The out-of-distribution check that admitted the image (``analysis.ood``)."""

    domain: str
    score: float = Field(
        description="distance to the nearest reference source over its threshold (≤ 1 admits)"
    )
    nearest_source: str = Field(description="the reference dataset the image is closest to")
    reference: str = Field(description="id of the out-of-distribution reference used")


class QualityInfo(_Part):
    """What the gate before scoring found: ``low_quality`` carries warnings; an image
    that fails the gate is never an Analysis (OutOfDomain: MedLens abstains)."""

    status: Literal["ok", "low_quality"]
    warnings: list[str]
    ood: OodCheck | None = Field(description="null when the model has no reference")


class ModelInfo(_Part):
    """The encoder and the calibration in force."""

    name: str
    fingerprint: str
    calibration: str | None
    classifier: str | None = Field(
        default=None,
        description="the supervised classifier (name@fingerprint) whose probabilities "
        "replace the zero-shot ones for the findings it covers; null when none",
    )


class ViewInfo(_Part):
    """One image file, without identifiers."""

    content_hash: str = Field(description="sha256 of the file bytes")
    context: StudyContext


class DermoscopyView(ViewInfo):
    """The dermoscopy image given beside a clinical photo, and how much it counted."""

    weight: float = Field(
        description="its weight a in the pair's logits (1 - a)·clinical + a·dermoscopy, "
        "fitted on validation pairs (the fusion head); 0.5 (unmeasured) without a head"
    )
    weight_source: str = Field(description="the fusion head it came from, or 'default'")


class InputInfo(ViewInfo):
    """What the input was, without identifiers."""

    dermoscopy: DermoscopyView | None = Field(
        default=None,
        description="the dermoscopy image of the same lesion, scored with the first image "
        "(a clinical photo); null when there was one image",
    )


class FindingRow(_Part):
    """One finding of the differential."""

    source: Literal["zero-shot", "classifier"] = "zero-shot"
    id: str
    name: str
    probability: float
    icd10: list[str]
    snomed: str
    risk: Risk


class FindingDescription(_Part):
    """The knowledge pack's description of one of the top findings."""

    id: str
    name: str
    sections: Description
    next_step: str
    source: str


class SymptomMatch(_Part):
    id: str
    name: str
    probability: float


class SymptomSummary(_Part):
    """Evidence from the symptom text; the text itself is never echoed."""

    sha256: str
    weight: float
    closest_findings: list[SymptomMatch]


class ContextEffect(_Part):
    """One finding's probability from the image alone and with the clinical context."""

    id: str
    name: str
    image_only: float
    with_context: float


class ContextSummary(_Part):
    """The clinical context the analysis used (issue 15): which fields were given, which
    were read from the symptom text (shown back so a wrong parse is visible), what could
    not be understood, and how the context moved the differential. Ages of 90 and over
    are reported as 90 (an age above 89 is an identifier)."""

    given: list[str] = Field(description="fields stated explicitly (history items as history.<id>)")
    parsed: list[str] = Field(description="fields filled from the free-text symptoms")
    values: dict[str, Any] = Field(description="the value of every known field")
    not_understood: list[str] = []
    conflicts: list[str] = Field(
        default=[], description="where the text contradicted a stated field (the field wins)"
    )
    used: list[str] = Field(description="fields the fusion head used to move the differential")
    fusion: str | None = Field(description="the fusion head (model fingerprint/domain), if any")
    note: str | None = Field(default=None, description="why the context did not move it, if so")
    effect: list[ContextEffect] = Field(
        default=[], description="top findings, image alone vs with the context"
    )
    disagreement: str | None = Field(
        default=None,
        description="set when image and context point to different findings with confidence",
    )


class SimilarCase(_Part):
    """A case of the case library near the image (``medlens.retrieval.similar_cases``)."""

    case_id: str | None
    dataset: str | None
    domain: str | None
    labels: list[str]
    findings: list[str]
    similarity: float
    text: str | None
    thumbnail: str | None
    image_path: str | None
    split: str | None
    sex: str | None
    age: float | None
    view: str | None
    point_id: str


class KnowledgePassage(_Part):
    """A knowledge-pack passage relevant to a top finding (``knowledge_passages``)."""

    finding_id: str
    finding_name: str
    section: str
    text: str
    source: str
    score: float


class Analysis(_Json):
    """Result of one analysis; its JSON is documented in docs/analysis.md."""

    model_config = ConfigDict(title="Analysis")

    schema_version: Literal[SCHEMA_VERSION] = SCHEMA_VERSION  # type: ignore[valid-type]
    domain: str = Field(description="id of the knowledge pack used for scoring")
    domain_detection: DomainDetection
    model: ModelInfo
    input: InputInfo
    quality: QualityInfo
    findings: list[FindingRow] = Field(
        description="the top-k findings by probability (in Python: all of them)"
    )
    triage: Triage
    descriptions: list[FindingDescription]
    symptoms: SymptomSummary | None = None
    context: ContextSummary | None = None
    similar_cases: list[SimilarCase] = []
    knowledge: list[KnowledgePassage] = []
    context_note: str | None = Field(
        default=None, description="why similar cases or knowledge are missing, if they are"
    )
    disclaimer: str = DISCLAIMER
    timings_ms: dict[str, float] = {}

    _top_k: int | None = PrivateAttr(default=None)
    _embedding: np.ndarray | None = PrivateAttr(default=None)

    def __init__(
        self, *, top_k: int | None = None, embedding: np.ndarray | None = None, **data: Any
    ) -> None:
        super().__init__(**data)
        self._top_k = top_k
        self._embedding = embedding

    @field_serializer("findings", mode="wrap")
    def _top_findings(self, rows: list[FindingRow], handler: SerializerFunctionWrapHandler):
        # No return annotation: the JSON schema keeps the field's own (list of FindingRow).
        return handler(rows[: self._top_k] if self._top_k else rows)

    @property
    def top_k(self) -> int:
        """How many findings the JSON lists."""
        return self._top_k if self._top_k is not None else len(self.findings)

    @property
    def embedding(self) -> np.ndarray | None:
        """The image embedding the analysis was made from (not part of the JSON)."""
        return self._embedding

    @property
    def domain_source(self) -> str:
        return self.domain_detection.source

    @property
    def domain_scores(self) -> dict[str, float]:
        return self.domain_detection.scores

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON (docs/analysis.md)."""
        return self.model_dump(mode="json")
