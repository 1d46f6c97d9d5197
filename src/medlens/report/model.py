"""The structured report: derived only from an ``Analysis``, never from free text.

``build_report(analysis)`` turns one analysis (the ``Analysis`` object or its JSON) into
a ``Report``: indication, technique, findings, impression, recommendation, evidence,
limitations and the disclaimer, plus a template narrative whose every sentence names
the report fields it was built from (``Sentence.fields``). Nothing in a report is
computed here: probabilities, codes, risk, the triage level and its reason are copied
from the analysis; this module only chooses which of them to state and in what words.

No identifiers: the study context of an analysis carries none (``io.StudyContext``);
a report keeps the DICOM study UID (a reference, not a person) and states age and sex
only as the header recorded them, with ages of 90 and over shown as "90 or older".
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from medlens.analysis.result import SCHEMA_VERSION, Analysis
from medlens.errors import ConfigError
from medlens.knowledge import domains, load_domain
from medlens.knowledge.schema import Risk

REPORT_VERSION = "1"
# The chosen domain's detection probability below which a report warns that the image
# may not belong to the domain it was scored in (out-of-distribution input).
LOW_DOMAIN_SCORE = 0.60

__all__ = [
    "LOW_DOMAIN_SCORE",
    "REPORT_VERSION",
    "Evidence",
    "EvidenceCase",
    "EvidencePassage",
    "Impression",
    "Indication",
    "Overlay",
    "Report",
    "ReportFinding",
    "Rewrite",
    "Sentence",
    "SimilarReport",
    "Technique",
    "build_report",
    "make_overlay",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Indication(_Model):
    """Why and on what the analysis was run, without identifiers."""

    text: str
    domain: str
    domain_name: str
    symptoms_given: bool
    age: str | None  # "62 years", "90 or older", or None
    sex: str | None  # "M", "F", "O" or None


class Technique(_Model):
    modality: str | None  # DICOM Modality, or None for a photograph / plain image file
    body_part: str | None
    view: str | None
    source_format: str
    width: int
    height: int
    study_uid: str | None  # a reference to the DICOM study, never a patient identifier
    model_name: str
    model_fingerprint: str
    calibration: str | None
    domain_source: Literal["given", "dicom", "image"]
    domain_score: float | None
    input_sha256: str


class ReportFinding(_Model):
    id: str
    name: str
    probability: float
    icd10: tuple[str, ...]
    snomed: str
    risk: Risk
    sets_triage: bool  # listed in the triage's ``triggered_by``


class Impression(_Model):
    text: str
    triage_level: Risk
    triage_reason: str
    top_findings: tuple[str, ...]  # finding ids named in the impression


class EvidencePassage(_Model):
    finding_id: str
    finding_name: str
    section: str
    text: str
    source: str


class EvidenceCase(_Model):
    case_id: str | None
    dataset: str | None
    findings: tuple[str, ...]
    labels: tuple[str, ...]
    similarity: float


class SimilarReport(_Model):
    """A past report of a similar study (IU X-ray, Open-i), nearest by text."""

    source_id: str  # the report's id in its dataset, e.g. "CXR1234"
    dataset: str
    impression: str | None
    findings: str | None
    similarity: float


class Overlay(_Model):
    """An explanation heatmap drawn over the image (PNG), e.g. Grad-CAM for a finding.

    ``png`` travels as base64 in the report's JSON."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    png: bytes
    title: str
    finding_id: str | None = None
    width: int
    height: int
    sha256: str


class Evidence(_Model):
    passages: tuple[EvidencePassage, ...]
    similar_cases: tuple[EvidenceCase, ...]
    note: str | None
    similar_reports: tuple[SimilarReport, ...] = ()
    similar_reports_note: str | None = None  # why there are none, when there are none
    overlay: Overlay | None = None


class Sentence(_Model):
    """One sentence of the narrative and the report fields it states."""

    text: str
    fields: tuple[str, ...]


class Rewrite(_Model):
    """What became of a language model's rewrite of the narrative (``report.llm``)."""

    accepted: bool
    text: str | None  # the rewrite shown instead of the template; None when not accepted
    note: str  # one line for the reader: rewritten and checked, or why the template is shown
    reasons: tuple[str, ...] = ()  # why it was rejected (grounding problems, time-out, ...)


class Report(_Model):
    report_version: Literal["1"] = REPORT_VERSION
    analysis_schema_version: str
    indication: Indication
    technique: Technique
    findings: tuple[ReportFinding, ...]
    impression: Impression
    recommendation: str
    evidence: Evidence
    limitations: tuple[str, ...]
    disclaimer: str
    narrative: tuple[Sentence, ...]
    rewrite: Rewrite | None = None

    @property
    def narrative_text(self) -> str:
        """The template narrative (what the grounding check compares against)."""
        return " ".join(s.text for s in self.narrative)

    @property
    def narrative_shown(self) -> str:
        """The narrative a reader sees: an accepted rewrite, else the template."""
        if self.rewrite is not None and self.rewrite.accepted and self.rewrite.text:
            return self.rewrite.text
        return self.narrative_text

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# -- building ------------------------------------------------------------------------------
def _as_analysis(analysis: Analysis | dict[str, Any]) -> Analysis:
    if isinstance(analysis, Analysis):
        return analysis
    if not isinstance(analysis, dict):
        raise ConfigError(f"a report needs an analysis, not {type(analysis).__name__}")
    if "error" in analysis and "findings" not in analysis:
        raise ConfigError(f"no report for a failed analysis: {analysis['error']}")
    version = analysis.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"analysis schema version {version!r} is not supported (reports read "
            f"version {SCHEMA_VERSION!r}); analyze the image again"
        )
    try:
        return Analysis.model_validate(analysis)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"not a valid analysis: {where}: {first['msg']}") from None


def _age(age_years: float | None) -> str | None:
    if age_years is None:
        return None
    return "90 or older" if age_years >= 90 else f"{int(age_years)} years"


def _pct(p: float) -> str:
    return f"{p:.0%}"


def _domain_name(domain: str) -> str:
    return load_domain(domain).domain.name if domain in domains() else domain


def _task(domain: str) -> str | None:
    return load_domain(domain).domain.task if domain in domains() else None


def _reported(a: Analysis) -> list[ReportFinding]:
    """The findings the analysis lists (its top-k) and any that set the triage."""
    triggered = set(a.triage.triggered_by)
    rows = [f for i, f in enumerate(a.findings) if i < a.top_k or f.id in triggered]
    return [
        ReportFinding(
            id=f.id,
            name=f.name,
            probability=f.probability,
            icd10=tuple(f.icd10),
            snomed=f.snomed,
            risk=f.risk,
            sets_triage=f.id in triggered,
        )
        for f in rows
    ]


def make_overlay(png: bytes, title: str, finding_id: str | None = None) -> Overlay:
    """An ``Overlay`` from PNG bytes; ConfigError when they are not a readable PNG."""
    import hashlib
    import io

    from PIL import Image, UnidentifiedImageError

    if not isinstance(png, bytes | bytearray) or not bytes(png).startswith(b"\x89PNG\r\n\x1a\n"):
        raise ConfigError("an overlay must be a PNG image")
    try:
        with Image.open(io.BytesIO(png)) as img:
            img.verify()
            width, height = img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ConfigError(f"the overlay PNG cannot be read: {exc}") from None
    return Overlay(
        png=bytes(png),
        title=title,
        finding_id=finding_id,
        width=width,
        height=height,
        sha256=hashlib.sha256(png).hexdigest(),
    )


def build_report(
    analysis: Analysis | dict[str, Any],
    *,
    study_uid: str | None = None,
    overlay: Overlay | None = None,
    similar_reports: tuple[SimilarReport, ...] = (),
    similar_reports_note: str | None = None,
) -> Report:
    """The report of one analysis (an ``Analysis`` or its ``to_dict()`` JSON).

    ``study_uid``: the DICOM Study Instance UID to link the report to (FHIR
    ``imagingStudy``). Analyses never carry it (UIDs are kept with the identifiers, not
    the context), so a caller that holds the identifiers and files the report into the
    site's record passes it explicitly.

    ``overlay``: an explanation heatmap (``make_overlay``) shown in the PDF and filed as a
    FHIR Media. ``similar_reports``: past reports of similar studies
    (``report.compose.similar_reports``), with ``similar_reports_note`` saying why there
    are none when there are none. Analyses carry neither; the caller adds them.

    ConfigError for a failed analysis, another schema version or invalid JSON.
    """
    a = _as_analysis(analysis)
    if not a.findings:
        raise ConfigError("no report for an analysis without findings")
    ctx = a.input.context
    domain_name = _domain_name(a.domain)
    task = _task(a.domain)
    sex = ctx.sex if ctx.sex in ("M", "F", "O") else None
    age = _age(ctx.age_years)

    what = f"DICOM {ctx.modality}" if ctx.modality else ctx.source_format.upper()
    indication_text = f"Decision-support triage of a {domain_name} image ({what})"
    demo = [x for x in (f"age {age}" if age else None, f"sex {sex}" if sex else None) if x]
    if demo:
        indication_text += f" ({', '.join(demo)} as recorded in the image header)"
    indication_text += (
        "; symptom text was supplied and used as evidence (not reproduced)."
        if a.symptoms is not None
        else "; no symptom text was supplied."
    )
    indication = Indication(
        text=indication_text,
        domain=a.domain,
        domain_name=domain_name,
        symptoms_given=a.symptoms is not None,
        age=age,
        sex=sex,
    )
    domain_score = a.domain_detection.scores.get(a.domain)
    technique = Technique(
        modality=ctx.modality,
        body_part=ctx.body_part,
        view=ctx.view,
        source_format=ctx.source_format,
        width=ctx.width,
        height=ctx.height,
        study_uid=study_uid,
        model_name=a.model.name,
        model_fingerprint=a.model.fingerprint,
        calibration=a.model.calibration,
        domain_source=a.domain_detection.source,
        domain_score=domain_score,
        input_sha256=a.input.content_hash,
    )
    findings = _reported(a)
    by_id = {f.id: f for f in findings}
    named = [by_id[i] for i in a.triage.triggered_by if i in by_id] or [findings[0]]
    top = findings[0]
    if top.id not in {f.id for f in named}:
        named = [top, *named]
    impression_text = (
        "Most likely: "
        + "; ".join(f"{f.name} ({_pct(f.probability)})" for f in named[:3])
        + f". Triage: {a.triage.level} — {a.triage.reason}."
    )
    impression = Impression(
        text=impression_text,
        triage_level=a.triage.level,
        triage_reason=a.triage.reason,
        top_findings=tuple(f.id for f in named[:3]),
    )
    recommendation = a.triage.next_step or next(
        (d.next_step for d in a.descriptions if d.id == top.id), ""
    )
    evidence = Evidence(
        passages=tuple(
            EvidencePassage(
                finding_id=p.finding_id,
                finding_name=p.finding_name,
                section=p.section,
                text=p.text,
                source=p.source,
            )
            for p in a.knowledge
        ),
        similar_cases=tuple(
            EvidenceCase(
                case_id=c.case_id,
                dataset=c.dataset,
                findings=tuple(c.findings),
                labels=tuple(c.labels),
                similarity=c.similarity,
            )
            for c in a.similar_cases
        ),
        note=a.context_note,
        similar_reports=tuple(similar_reports),
        similar_reports_note=similar_reports_note,
        overlay=overlay,
    )
    limitations = _limitations(a, domain_name, task, domain_score)
    narrative = _narrative(indication, technique, findings, impression, recommendation, task)
    sections = {
        "indication": indication,
        "technique": technique,
        "findings": tuple(findings),
        "impression": impression,
        "recommendation": recommendation,
        "evidence": evidence,
        "limitations": tuple(limitations),
        "narrative": tuple(narrative),
    }
    return Report(analysis_schema_version=a.schema_version, disclaimer=a.disclaimer, **sections)


def _limitations(
    a: Analysis, domain_name: str, task: str | None, domain_score: float | None
) -> list[str]:
    out = [
        f"Model {a.model.name} (fingerprint {a.model.fingerprint}) scores only the findings "
        f"of the {domain_name} knowledge pack; anything else is not assessed.",
    ]
    if a.model.calibration:
        out.append(
            f"Probabilities are calibrated on validation data (calibration "
            f"{a.model.calibration}); they are estimates, not test results."
        )
    else:
        out.append("The model has no calibration: probabilities are uncalibrated scores.")
    if task == "multi_label":
        out.append("Each finding has its own probability; they do not add up to one.")
    elif task == "single_label":
        out.append("The probabilities are shares of one differential and add up to one.")
    if domain_score is not None and domain_score < LOW_DOMAIN_SCORE:
        out.append(
            f"Warning: the image scored only {_pct(domain_score)} as {domain_name.lower()}; "
            "it may be out of scope for this model and the result may not apply."
        )
    for w in a.quality.warnings:  # low quality, or no out-of-distribution check
        out.append(f"Warning: {w[:1].upper()}{w[1:]}.")
    if a.context_note:
        out.append(f"Context: {a.context_note}.")
    return out


def _narrative(
    ind: Indication,
    tech: Technique,
    findings: list[ReportFinding],
    imp: Impression,
    recommendation: str,
    task: str | None,
) -> list[Sentence]:
    """Template sentences, each built only from the fields it lists."""
    out = [Sentence(text=ind.text, fields=("indication.text",))]
    view = f"{tech.view} view, " if tech.view else ""
    out.append(
        Sentence(
            text=f"Model {tech.model_name} (fingerprint {tech.model_fingerprint}) analysed "
            f"the input ({view}{tech.width}×{tech.height} {tech.source_format.upper()}).",
            fields=(
                "technique.model_name",
                "technique.model_fingerprint",
                "technique.view",
                "technique.width",
                "technique.height",
                "technique.source_format",
            ),
        )
    )
    listing = "; ".join(
        f"{f.name} {_pct(f.probability)} (ICD-10-CM {', '.join(f.icd10)}; {f.risk} risk)"
        for f in findings
    )
    kind = "Per-finding probabilities" if task == "multi_label" else "Differential"
    out.append(Sentence(text=f"{kind}: {listing}.", fields=("findings",)))
    out.append(
        Sentence(
            text=imp.text,
            fields=(
                "impression.top_findings",
                "impression.triage_level",
                "impression.triage_reason",
            ),
        )
    )
    if recommendation:
        out.append(
            Sentence(text=f"Recommended next step: {recommendation}", fields=("recommendation",))
        )
    return out
