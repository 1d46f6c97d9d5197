"""Markdown rendering of a ``Report``: one document a person reads or pastes into a note."""

from __future__ import annotations

from medlens.report.model import Report

__all__ = ["to_markdown"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(report: Report) -> str:
    r, t = report, report.technique
    lines = [
        f"# MedLens report — {r.indication.domain_name}",
        "",
        f"> **{r.disclaimer}**",
        "",
        "## Indication",
        "",
        r.indication.text,
        "",
        "## Technique",
        "",
        f"- Input: {t.source_format.upper()}, {t.width}×{t.height} px"
        + (f", modality {t.modality}" if t.modality else "")
        + (f", body part {t.body_part}" if t.body_part else "")
        + (f", view {t.view}" if t.view else ""),
        f"- Model: {t.model_name}, fingerprint `{t.model_fingerprint}`, "
        f"calibration `{t.calibration or 'none'}`",
        f"- Domain chosen from: {t.domain_source}"
        + (f" (domain score {t.domain_score:.0%})" if t.domain_score is not None else ""),
        f"- Input SHA-256: `{t.input_sha256}`",
    ]
    if t.study_uid:
        lines.append(f"- DICOM study: `{t.study_uid}`")
    lines += [
        "",
        "## Findings",
        "",
        "| # | Finding | Probability | ICD-10-CM | SNOMED CT | Risk | Sets triage |",
        "|---:|---|---:|---|---|---|---|",
    ]
    for i, f in enumerate(r.findings, 1):
        lines.append(
            f"| {i} | {_cell(f.name)} | {f.probability:.1%} | {', '.join(f.icd10)} | "
            f"{f.snomed} | {f.risk} | {'yes' if f.sets_triage else ''} |"
        )
    lines += [
        "",
        "## Impression",
        "",
        f"**Triage: {r.impression.triage_level.upper()}.** {r.impression.text}",
        "",
        "## Recommendation",
        "",
        r.recommendation or "None given.",
        "",
        "## Narrative",
        "",
        r.narrative_shown,
        "",
    ]
    if r.rewrite is not None:
        lines += [f"_{r.rewrite.note}_", ""]
    lines += ["## Evidence", ""]
    if r.evidence.overlay is not None:
        o = r.evidence.overlay
        lines += [
            f"Heatmap: {o.title} ({o.width}×{o.height} PNG, SHA-256 `{o.sha256[:16]}…`; "
            "in the PDF and as a FHIR Media).",
            "",
        ]
    if r.evidence.passages:
        lines.append("Knowledge passages:")
        lines.append("")
        for p in r.evidence.passages:
            lines.append(f"- **{p.finding_name}** ({p.section}): {p.text} — _{p.source}_")
        lines.append("")
    if r.evidence.similar_cases:
        lines.append("Similar cases:")
        lines.append("")
        for c in r.evidence.similar_cases:
            labels = ", ".join(c.findings or c.labels) or "unlabelled"
            lines.append(
                f"- {c.dataset or 'case'} {c.case_id or ''}: {labels} "
                f"(similarity {c.similarity:.2f})"
            )
        lines.append("")
    if r.evidence.similar_reports:
        lines.append("Reports of similar studies (nearest past reports by text; not this patient):")
        lines.append("")
        for sr in r.evidence.similar_reports:
            said = " ".join(x for x in (sr.impression, sr.findings) if x) or "(no text)"
            lines.append(
                f"- {sr.dataset} {sr.source_id} (similarity {sr.similarity:.2f}): {_cell(said)}"
            )
        lines.append("")
    elif r.evidence.similar_reports_note:
        lines += [f"_{r.evidence.similar_reports_note}_", ""]
    if r.evidence.note:
        lines += [f"_{r.evidence.note}_", ""]
    lines += ["## Limitations", ""]
    lines += [f"- {x}" for x in r.limitations]
    lines += ["", "---", "", f"_{r.disclaimer}_", ""]
    return "\n".join(lines)
