"""The one place the surfaces (``medlens report``, ``POST /v1/report``) make a report.

``compose_report(analysis, settings=...)``:

1. builds the report draft from the analysis (``build_report``);
2. for a chest X-ray, adds the IU X-ray reports nearest to the draft's text as
   "reports of similar studies" (``similar_reports``; a note says why there are none when
   the IU folder is not under MEDLENS_DATA);
3. when ``settings.llm_url`` (MEDLENS_LLM_URL) is set, asks that endpoint to rewrite the
   narrative for readability and keeps the rewrite only if the grounding check accepts
   it; a time-out, a connection error, an unusable answer or a rejected rewrite leaves
   the template narrative with a note (``Report.rewrite``). Never raises for the
   endpoint's faults; bounded by ``settings.llm_timeout_s``.

``settings`` come from the entry point; nothing here reads the environment.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medlens.errors import MedLensError
from medlens.report.model import Overlay, Report, Rewrite, SimilarReport, build_report

if TYPE_CHECKING:
    from medlens.analysis.result import Analysis
    from medlens.config import Settings

__all__ = ["SIMILAR_REPORTS_K", "compose_report", "rewrite", "similar_reports"]

log = logging.getLogger("medlens")
SIMILAR_REPORTS_K = 3
SIMILAR_DOMAINS = ("chest_xray",)


_building: dict[str, threading.Thread] = {}
_building_lock = threading.Lock()


def _index(root: Path, settings: Settings, wait: bool) -> Any:
    """The report index; with ``wait=False`` None while it is still being built (the
    first build embeds every report: minutes on a small CPU), built in the background."""
    from medlens.embeddings import open_store
    from medlens.retrieval import reports as R

    store = open_store(settings.cache_dir)
    if wait:
        return R.load_report_index(root, store=store)
    ready = R.cached_report_index(root)
    if ready is not None:
        return ready
    key = str(root)
    with _building_lock:
        t = _building.get(key)
        if t is None or not t.is_alive():

            def build() -> None:
                try:
                    R.load_report_index(root, store=store)
                except Exception as exc:
                    log.warning("similar-report index not built: %s", type(exc).__name__)

            t = threading.Thread(target=build, name="medlens-report-index", daemon=True)
            _building[key] = t
            t.start()
    return None


def similar_reports(
    draft: Report, settings: Settings, k: int = SIMILAR_REPORTS_K, *, wait: bool = True
) -> tuple[tuple[SimilarReport, ...], str | None]:
    """The IU X-ray reports nearest to ``draft``'s impression findings, and a note when
    there are none (other domain, no IU folder, encoder missing). ``wait=False`` (the
    API): when the index is not built yet, start building it and answer with a note."""
    if draft.indication.domain not in SIMILAR_DOMAINS:
        return (), None
    from medlens.retrieval import reports as R

    root = settings.data / R.IU_FOLDER if settings.data is not None else None
    if root is None or not (root / "reports.csv").is_file():
        return (), f"no past reports to compare with ({R.IU_FOLDER} is not under MEDLENS_DATA)"
    query = R.draft_query(draft.impression.top_findings, draft.indication.domain)
    if not query:
        return (), "no past reports searched: the impression names no pack finding"
    try:
        from medlens.embeddings import open_store

        index = _index(root, settings, wait)
        if index is None:
            return (), "similar past reports are being indexed (first use); ask again shortly"
        hits = index.nearest(query, k=k, store=open_store(settings.cache_dir))
    except (MedLensError, OSError) as exc:
        # One line, no texts: the query is built from pack names, never patient data.
        log.warning("similar reports unavailable: %s", type(exc).__name__)
        return (), f"similar past reports unavailable: {type(exc).__name__}"
    return tuple(
        SimilarReport(
            source_id=h.source_id,
            dataset=h.dataset,
            impression=h.impression,
            findings=h.findings,
            similarity=h.similarity,
        )
        for h in hits
    ), None


def rewrite(report: Report, url: str, *, timeout_s: float, model: str = "default") -> Rewrite:
    """The language model's rewrite of ``report``'s narrative, checked (``report.llm``)."""
    from medlens.report.llm import rewrite_narrative

    g = rewrite_narrative(report, url, model=model, timeout_s=timeout_s)
    if g.source == "rewrite":
        return Rewrite(
            accepted=True,
            text=g.text,
            note="Narrative rewritten for readability by a language model and checked "
            "against the structured report.",
        )
    first = g.rejected_because[0] if g.rejected_because else "no rewrite"
    more = f" (+{len(g.rejected_because) - 1} more)" if len(g.rejected_because) > 1 else ""
    return Rewrite(
        accepted=False,
        text=None,
        note=f"Template narrative shown: the language-model rewrite was not used ({first}{more}).",
        reasons=g.rejected_because,
    )


def compose_report(
    analysis: Analysis | dict[str, Any],
    *,
    settings: Settings,
    overlay: Overlay | None = None,
    study_uid: str | None = None,
    wait_for_index: bool = True,
) -> Report:
    """The report of one analysis with similar past reports and, when MEDLENS_LLM_URL is
    set, a grounded rewrite of its narrative. ``wait_for_index=False``: do not wait for a
    first build of the similar-report index (a note says so)."""
    draft = build_report(analysis, study_uid=study_uid, overlay=overlay)
    found, note = similar_reports(draft, settings, wait=wait_for_index)
    report = draft
    if found or note:
        evidence = draft.evidence.model_copy(
            update={"similar_reports": found, "similar_reports_note": note}
        )
        report = draft.model_copy(update={"evidence": evidence})
    if settings.llm_url:
        done = rewrite(
            report, settings.llm_url, timeout_s=settings.llm_timeout_s, model=settings.llm_model
        )
        report = report.model_copy(update={"rewrite": done})
    return report
