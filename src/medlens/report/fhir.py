"""A FHIR R4B Bundle of a ``Report`` (``fhir.resources.R4B``) and its structural check.

The Bundle (type ``collection``) holds:

* ``DiagnosticReport`` (status ``preliminary``, LOINC 18748-4 "Diagnostic imaging
  study"): the impression as ``conclusion`` with SNOMED CT ``conclusionCode``, the
  narrative as generated XHTML, the Markdown report as ``presentedForm``, and the DICOM
  study, when the input was DICOM, only as a logical reference by its study UID;
* one ``Observation`` per reported finding: SNOMED CT and ICD-10-CM codings, the
  calibrated probability as ``valueQuantity`` (UCUM ``1``), the triage role as
  ``interpretation``, ``device`` → the model;
* ``Device``: the model (name, version = encoder fingerprint, calibration id);
* ``Provenance``: the Device produced the report and the Observations from the input
  (by its SHA-256);
* ``Media`` (when the report carries an explanation overlay): the heatmap PNG inline,
  ``DiagnosticReport.media`` links to it, ``device`` → the model.

Every resource carries ``meta.security`` AIAST (HL7 v3 ObservationValue "artificial
intelligence asserted"), as the HL7 AI Transparency on FHIR guide proposes. There is no
Patient and no ``subject``: a MedLens report carries no patient identifiers.

``fhir.resources`` checks datatypes and cardinalities but no profiles, so
``check_bundle`` adds what a receiving system relies on: required elements, the code
system URIs, ICD-10-CM codes that exist (``medlens.knowledge.codes``), well-formed
SNOMED CT ids, literal references that resolve inside the Bundle, and Media that are
linked from the DiagnosticReport and hold a decodable image matching its hash.
"""

from __future__ import annotations

import base64
import hashlib
import html
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from medlens.knowledge.codes import icd10cm_exists, snomed_valid
from medlens.report.markdown import to_markdown
from medlens.report.model import Report

__all__ = ["AIAST", "SYSTEMS", "check_bundle", "to_fhir_bundle", "to_fhir_json"]

SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
PROVENANCE_AGENT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
MEDIA_TYPE = "http://terminology.hl7.org/CodeSystem/media-type"
OVERLAY_HASH = "urn:medlens:overlay-sha256"
DICOM_UID = "urn:dicom:uid"
INPUT_HASH = "urn:medlens:input-sha256"

# Every code system a MedLens Bundle may use; anything else is a mistake.
SYSTEMS = frozenset(
    {SNOMED, ICD10CM, LOINC, UCUM, V3_OBSERVATION_VALUE, V3_INTERPRETATION, OBS_CATEGORY,
     PROVENANCE_AGENT, MEDIA_TYPE}
)  # fmt: skip
AIAST = {
    "system": V3_OBSERVATION_VALUE,
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
REPORT_CODE = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}
_INTERPRETATION = {
    "urgent": {"system": V3_INTERPRETATION, "code": "AA", "display": "Critical abnormal"},
    "soon": {"system": V3_INTERPRETATION, "code": "A", "display": "Abnormal"},
}


def _uuid(report: Report, kind: str, key: str = "") -> str:
    """Deterministic ids: the same analysis gives the same Bundle (bar ``recorded``)."""
    t = report.technique
    seed = f"medlens:{t.input_sha256}:{t.model_fingerprint}:{t.calibration}:{kind}:{key}"
    return str(uuid.uuid5(uuid.NAMESPACE_URL, seed))


def _meta() -> dict[str, Any]:
    return {"security": [dict(AIAST)]}


def _finding_code(f: Any) -> dict[str, Any]:
    # A finding without a specific SNOMED CT concept carries none (never a generic one).
    codings = [{"system": SNOMED, "code": f.snomed, "display": f.name}] if f.snomed else []
    codings += [{"system": ICD10CM, "code": c} for c in f.icd10]
    return {"coding": codings, "text": f.name}


def _media(report: Report, device_url: str, when: str) -> dict[str, Any] | None:
    """The explanation overlay as a Media resource (PNG inline), or None."""
    o = report.evidence.overlay
    if o is None:
        return None
    return {
        "resourceType": "Media",
        "id": _uuid(report, "media", o.sha256),
        "meta": _meta(),
        "identifier": [{"system": OVERLAY_HASH, "value": o.sha256}],
        "status": "completed",
        "type": {"coding": [{"system": MEDIA_TYPE, "code": "image", "display": "Image"}]},
        "createdDateTime": when,
        "device": {"reference": device_url},
        "width": o.width,
        "height": o.height,
        "content": {
            "contentType": "image/png",
            "data": base64.b64encode(o.png).decode(),
            # FHIR Attachment.hash is the base64 SHA-1 of the data.
            "hash": base64.b64encode(hashlib.sha1(o.png).digest()).decode(),
            "size": len(o.png),
            "title": o.title,
        },
        "note": [{"text": "Explanation heatmap computed by an AI model; not a finding."}],
    }


def _xhtml(report: Report) -> str:
    if report.rewrite is not None and report.rewrite.accepted and report.rewrite.text:
        paras = f"<p>{html.escape(report.rewrite.text)}</p>"
    else:
        paras = "".join(f"<p>{html.escape(s.text)}</p>" for s in report.narrative)
    if report.rewrite is not None:
        paras += f"<p><i>{html.escape(report.rewrite.note)}</i></p>"
    disclaimer = f"<p><b>{html.escape(report.disclaimer)}</b></p>"
    return f'<div xmlns="http://www.w3.org/1999/xhtml">{paras}{disclaimer}</div>'


def _study_ref(report: Report) -> dict[str, Any] | None:
    uid = report.technique.study_uid
    if not uid:
        return None
    return {
        "type": "ImagingStudy",
        "identifier": {"system": DICOM_UID, "value": f"urn:oid:{uid}"},
        "display": "DICOM study of the analysed image",
    }


def to_fhir_json(report: Report, *, recorded: datetime | None = None) -> dict[str, Any]:
    """The Bundle as FHIR JSON (a dict); ``to_fhir_bundle`` parses it with R4B."""
    when = (recorded or datetime.now(UTC)).isoformat(timespec="seconds")
    t = report.technique
    device_url = f"urn:uuid:{_uuid(report, 'device')}"
    report_url = f"urn:uuid:{_uuid(report, 'report')}"
    study = _study_ref(report)

    versions = [{"type": {"text": "encoder fingerprint"}, "value": t.model_fingerprint}]
    if t.calibration:
        versions.append({"type": {"text": "calibration"}, "value": t.calibration})
    device = {
        "resourceType": "Device",
        "id": _uuid(report, "device"),
        "meta": _meta(),
        "deviceName": [{"name": f"MedLens {t.model_name}", "type": "model-name"}],
        "manufacturer": "MedLens (research software)",
        "version": versions,
        "note": [{"text": report.disclaimer}],
    }

    observations: list[tuple[str, dict[str, Any]]] = []
    for f in report.findings:
        oid = _uuid(report, "observation", f.id)
        interp: dict[str, Any] = {
            "text": (
                f"sets the {f.risk} triage"
                if f.sets_triage
                else f"{f.risk} risk finding; did not set the triage"
            )
        }
        if f.sets_triage and f.risk in _INTERPRETATION:
            interp["coding"] = [dict(_INTERPRETATION[f.risk])]
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": oid,
            "meta": _meta(),
            "status": "preliminary",
            "category": [{"coding": [{"system": OBS_CATEGORY, "code": "imaging"}]}],
            "code": _finding_code(f),
            "effectiveDateTime": when,
            "valueQuantity": {
                "value": f.probability,
                "unit": "probability",
                "system": UCUM,
                "code": "1",
            },
            "interpretation": [interp],
            "device": {"reference": device_url},
            "note": [{"text": "Calibrated probability estimated by an AI model."}],
        }
        if study:
            obs["derivedFrom"] = [study]
        observations.append((f"urn:uuid:{oid}", obs))

    top = {f.id: f for f in report.findings}
    diagnostic = {
        "resourceType": "DiagnosticReport",
        "id": _uuid(report, "report"),
        "meta": _meta(),
        "text": {"status": "generated", "div": _xhtml(report)},
        "status": "preliminary",
        "code": {"coding": [dict(REPORT_CODE)], "text": f"MedLens {report.indication.domain_name}"},
        "effectiveDateTime": when,
        "issued": when,
        "result": [{"reference": url} for url, _ in observations],
        "conclusion": f"{report.impression.text} {report.recommendation}".strip(),
        "conclusionCode": [
            {"coding": [{"system": SNOMED, "code": top[i].snomed, "display": top[i].name}]}
            for i in report.impression.top_findings
            if i in top and top[i].snomed
        ],
        "presentedForm": [
            {
                "contentType": "text/markdown",
                "data": base64.b64encode(to_markdown(report).encode()).decode(),
                "title": "MedLens report (Markdown)",
            }
        ],
    }
    if study:
        diagnostic["imagingStudy"] = [study]
    media = _media(report, device_url, when)
    media_url = f"urn:uuid:{media['id']}" if media else None
    if media:
        diagnostic["media"] = [
            {"comment": media["content"]["title"], "link": {"reference": media_url}}
        ]

    provenance = {
        "resourceType": "Provenance",
        "id": _uuid(report, "provenance"),
        "meta": _meta(),
        "target": [{"reference": report_url}]
        + [{"reference": u} for u, _ in observations]
        + ([{"reference": media_url}] if media_url else []),
        "recorded": when,
        "agent": [
            {
                "type": {"coding": [{"system": PROVENANCE_AGENT, "code": "author"}]},
                "who": {"reference": device_url},
            }
        ],
        "entity": [
            {
                "role": "source",
                "what": {
                    "identifier": {"system": INPUT_HASH, "value": t.input_sha256},
                    "display": "the analysed image, by its SHA-256",
                },
            }
        ],
    }
    entries = [(report_url, diagnostic), *observations, (device_url, device)]
    if media and media_url:
        entries.append((media_url, media))
    entries.append((f"urn:uuid:{provenance['id']}", provenance))
    return {
        "resourceType": "Bundle",
        "id": _uuid(report, "bundle"),
        "meta": _meta(),
        "type": "collection",
        "timestamp": when,
        "entry": [{"fullUrl": url, "resource": res} for url, res in entries],
    }


def to_fhir_bundle(report: Report, *, recorded: datetime | None = None) -> Any:
    """The report as a ``fhir.resources.R4B.bundle.Bundle``."""
    from fhir.resources.R4B.bundle import Bundle

    return Bundle.model_validate(to_fhir_json(report, recorded=recorded))


# -- the structural check ------------------------------------------------------------------
def _walk(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _has_aiast(res: dict[str, Any]) -> bool:
    sec = (res.get("meta") or {}).get("security") or []
    return any(s.get("system") == V3_OBSERVATION_VALUE and s.get("code") == "AIAST" for s in sec)


def _as_json(bundle: Any) -> tuple[dict[str, Any] | None, list[str]]:
    from fhir.resources.R4B.bundle import Bundle

    if isinstance(bundle, Bundle):
        return bundle.model_dump(mode="json", exclude_none=True), []
    if not isinstance(bundle, dict):
        return None, [f"not a Bundle: {type(bundle).__name__}"]
    try:
        Bundle.model_validate(bundle)
    except (ValidationError, ValueError) as exc:
        return bundle, [f"does not parse as a FHIR R4B Bundle: {str(exc).splitlines()[0]}"]
    return bundle, []


# What every MedLens Bundle must hold: resource kinds with their counts, and per
# kind the elements (dotted paths; a list index 0 is taken) that must be non-empty.
REQUIRED_RESOURCES: dict[str, tuple[int, int | None]] = {  # (at least, at most)
    "DiagnosticReport": (1, 1),
    "Observation": (1, None),  # one per reported finding
    "Device": (1, 1),  # the model
    "Provenance": (1, None),
    "Media": (0, None),  # one per explanation overlay, each linked from DiagnosticReport.media
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "DiagnosticReport": ("code.coding", "result", "conclusion"),
    "Observation": ("status", "interpretation", "device.reference"),
    "Device": ("version.value", "deviceName"),
    "Provenance": ("target", "recorded", "agent"),
    "Media": ("status", "content.contentType", "content.data", "device.reference"),
}


def _at(node: Any, path: str) -> Any:
    """The value at a dotted ``path`` (a list: its first item), or None."""
    for part in path.split("."):
        if isinstance(node, list):
            node = node[0] if node else None
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _check_media(by_type: dict[str, list[tuple[str, dict[str, Any]]]]) -> list[str]:
    """Media: a PNG/JPEG image whose data decodes and matches its hash, linked from the
    DiagnosticReport; every DiagnosticReport.media link points at a Media."""
    problems: list[str] = []
    media = dict(by_type.get("Media", []))
    linked: set[str] = set()
    for url, r in by_type.get("DiagnosticReport", []):
        for i, m in enumerate(r.get("media") or []):
            ref = ((m or {}).get("link") or {}).get("reference")
            if not ref:
                problems.append(f"{url}: DiagnosticReport.media[{i}].link has no reference")
            elif ref in media:
                linked.add(ref)
            else:
                problems.append(f"{url}: DiagnosticReport.media[{i}] does not link to a Media")
    for url, m in media.items():
        if url not in linked:
            problems.append(f"{url}: Media is not linked from DiagnosticReport.media")
        content = m.get("content") or {}
        if content.get("contentType") not in ("image/png", "image/jpeg"):
            problems.append(f"{url}: Media.content.contentType must be image/png or image/jpeg")
        try:
            data = base64.b64decode(content.get("data") or "", validate=True)
        except (ValueError, TypeError):
            problems.append(f"{url}: Media.content.data is not base64")
            continue
        if not data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
            problems.append(f"{url}: Media.content.data is not a PNG or JPEG image")
        sha1 = base64.b64encode(hashlib.sha1(data).digest()).decode()
        if content.get("hash") and content["hash"] != sha1:
            problems.append(f"{url}: Media.content.hash does not match its data")
    return problems


def check_bundle(bundle: Any) -> list[str]:
    """Problems of a MedLens FHIR Bundle (a ``Bundle`` or its JSON); empty = passes."""
    data, problems = _as_json(bundle)
    if data is None:
        return problems
    if data.get("resourceType") != "Bundle":
        return [*problems, "resourceType is not Bundle"]
    if not data.get("type"):
        problems.append("Bundle.type is missing")
    entries = data.get("entry") or []
    urls: dict[str, dict[str, Any]] = {}
    for i, e in enumerate(entries):
        url, res = e.get("fullUrl"), e.get("resource")
        if not url or not isinstance(res, dict):
            problems.append(f"entry[{i}] needs a fullUrl and a resource")
            continue
        if url in urls:
            problems.append(f"entry[{i}]: duplicate fullUrl {url}")
        urls[url] = res
    by_type: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for url, res in urls.items():
        by_type.setdefault(res.get("resourceType", ""), []).append((url, res))

    # no patient data at all
    for kind in ("Patient", "Person", "RelatedPerson"):
        if kind in by_type:
            problems.append(f"the Bundle holds a {kind}: reports carry no patient identifiers")
    for path, node in _walk(data, "Bundle"):
        if "subject" in node:
            problems.append(f"{path}.subject: reports carry no patient reference")

    # required resources and elements (REQUIRED: dotted paths that must be non-empty)
    for kind, (least, most) in REQUIRED_RESOURCES.items():
        found = len(by_type.get(kind, []))
        if found < least or (most is not None and found > most):
            want = f"{least}" if least == most else f"at least {least}"
            problems.append(f"expected {want} {kind}, found {found}")
    for kind, paths in REQUIRED.items():
        for url, res in by_type.get(kind, []):
            problems += [f"{url}: {kind}.{p} is missing" for p in paths if not _at(res, p)]
    for url, r in by_type.get("DiagnosticReport", []):
        if r.get("status") != "preliminary":
            problems.append(f"{url}: DiagnosticReport.status must be preliminary")
    for url, o in by_type.get("Observation", []):
        codings = (o.get("code") or {}).get("coding") or []
        systems = {c.get("system") for c in codings}
        # ICD-10-CM always; SNOMED CT where the finding has a specific concept (a finding
        # without one carries none rather than a generic code: issue 13 item 7).
        if ICD10CM not in systems:
            problems.append(f"{url}: Observation.code needs an ICD-10-CM coding")
        if any(not c.get("code") for c in codings):
            problems.append(f"{url}: Observation.code has a coding without a code")
        v = (o.get("valueQuantity") or {}).get("value")
        if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v <= 1:
            problems.append(f"{url}: Observation.valueQuantity.value must be a probability")
    problems += _check_media(by_type)
    for url, res in urls.items():
        if not _has_aiast(res):
            problems.append(f"{url}: meta.security lacks AIAST ({V3_OBSERVATION_VALUE})")

    # code systems and codes
    for path, node in _walk(data, "Bundle"):
        if "code" in node and "system" in node and isinstance(node.get("code"), str):
            system, code = node["system"], node["code"]
            if system not in SYSTEMS:
                problems.append(f"{path}: unknown code system {system!r}")
            elif system == ICD10CM and not icd10cm_exists(code):
                problems.append(f"{path}: ICD-10-CM code {code!r} does not exist")
            elif system == SNOMED and not snomed_valid(code):
                problems.append(f"{path}: SNOMED CT id {code!r} is not well formed")
        elif "coding" in node and isinstance(node["coding"], list):
            for j, c in enumerate(node["coding"]):
                if isinstance(c, dict) and not c.get("system"):
                    problems.append(f"{path}.coding[{j}]: coding without a system")

    # literal references resolve inside the Bundle
    for path, node in _walk(data, "Bundle"):
        ref = node.get("reference")
        if isinstance(ref, str) and ref not in urls:
            problems.append(f"{path}: reference {ref} does not resolve inside the Bundle")
    return problems
