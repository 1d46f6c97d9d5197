"""MedLens clinician UI (Streamlit). It talks only to the MedLens API (MEDLENS_API_URL).

Run with ``medlens ui`` (or ``medlens demo`` for API + UI together). The preview is
decoded locally for display only; identifiers in DICOM headers are never shown.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from medlens.config import get_settings
from medlens.ui.client import ApiClient, ApiError
from medlens.ui.context_form import context_inputs, render_context
from medlens.ui.downloads import downloads_panel
from medlens.ui.overlay import explain_panel

DISCLAIMER = (
    "**Decision support only — not a diagnosis.** MedLens is research software. Every "
    "result must be interpreted by a qualified clinician together with the history, "
    "examination and other tests."
)
# Material icons ship with Streamlit (emoji depend on the viewer's fonts).
TRIAGE_STYLE = {
    "urgent": (st.error, ":material/emergency:"),
    "soon": (st.warning, ":material/schedule:"),
    "routine": (st.success, ":material/check_circle:"),
}
SECTION_TITLES = {
    "presentation": "Presentation",
    "history": "History and symptoms",
    "image_features": "Image features",
    "differentials": "Differentials",
}

# HOOK for later features: capability name (from /v1/info) -> panel renderer taking
# (client, analysis JSON, uploaded bytes, file name). Heatmaps ("explain") and reports
# ("report") register here when their API routes exist.
EXTRA_PANELS: dict[str, Callable[[ApiClient, dict[str, Any], bytes, str], None]] = {}
EXTRA_PANELS["explain"] = explain_panel  # POST /v1/explain (medlens.ui.overlay)
EXTRA_PANELS["report"] = downloads_panel  # POST /v1/report (medlens.ui.downloads)


@st.cache_resource
def _client(url: str, key: str | None) -> ApiClient:
    return ApiClient(url, key)


@st.cache_resource
def _context_vocabulary(domain_ids: tuple[str, ...]) -> Any:
    """The clinical-context vocabulary of the first pack that has one (dermatology), or
    None: the form's choices are pack data."""
    from medlens.knowledge import load_domain

    for d in domain_ids:
        try:
            vocab = load_domain(d).domain.context
        except Exception:  # a pack the UI cannot read here: the API still knows it
            continue
        if vocab is not None:
            return vocab
    return None


@st.cache_data(max_entries=16, show_spinner=False)
def _preview(data: bytes, name: str) -> tuple[Any, str]:
    """Pixels for display and a one-line description, or (None, error)."""
    from medlens.errors import MedLensError
    from medlens.io import load_image

    try:
        img = load_image(data, filename=name)
    except MedLensError as exc:
        return None, str(exc)
    c = img.context
    extra = f", {c.modality} {c.body_part or ''} {c.view or ''}" if c.modality else ""
    return img.pixels, f"{c.source_format.upper()} {c.width}×{c.height}{extra}"


def differential_chart(findings: list[dict[str, Any]]) -> alt.Chart:
    df = pd.DataFrame(
        {
            "finding": [f["name"] for f in findings],
            "probability": [f["probability"] for f in findings],
            "risk": [f["risk"] for f in findings],
        }
    )
    base = alt.Chart(df).encode(
        y=alt.Y("finding:N", sort=list(df["finding"]), title=None, axis=alt.Axis(labelLimit=260)),
        x=alt.X("probability:Q", title="probability", scale=alt.Scale(domain=[0, 1])),
    )
    bars = base.mark_bar().encode(
        color=alt.Color(
            "risk:N",
            scale=alt.Scale(
                domain=["urgent", "soon", "routine"], range=["#d62728", "#ff9f1c", "#2ca02c"]
            ),
            legend=alt.Legend(title="risk", orient="bottom"),
        ),
        tooltip=["finding", alt.Tooltip("probability:Q", format=".1%"), "risk"],
    )
    labels = base.mark_text(align="left", dx=4).encode(text=alt.Text("probability:Q", format=".1%"))
    return (bars + labels).properties(height=chart_height(len(df)))


def chart_height(n: int) -> int:
    return 34 * n + 20


def render_triage(tri: dict[str, Any]) -> None:
    show, icon = TRIAGE_STYLE.get(tri["level"], (st.info, ":material/info:"))
    with st.container(key="ml-triage"):
        text = f"**Triage: {tri['level'].upper()}** — {tri['reason']}"
        if tri.get("next_step"):
            text += f"  \n**Next step:** {tri['next_step']}"
        show(text, icon=icon)


def render_knowledge(result: dict[str, Any]) -> None:
    st.subheader("Knowledge")
    codes = {f["id"]: f for f in result["findings"]}
    for i, d in enumerate(result["descriptions"]):
        f = codes.get(d["id"], {})
        with st.expander(f"{d['name']} — {f.get('risk', '')}", expanded=i == 0):
            codes_line = f"ICD-10-CM {', '.join(f.get('icd10', [])) or '—'}"
            codes_line += f" · SNOMED CT {f.get('snomed') or '— (no specific concept)'}"
            st.caption(codes_line)
            for key, title in SECTION_TITLES.items():
                if d["sections"].get(key):
                    st.markdown(f"**{title}.** {d['sections'][key]}")
            if d.get("next_step"):
                st.markdown(f"**Next step.** {d['next_step']}")
            st.caption(f"Source: `{d['source']}` (MedLens knowledge pack)")


@st.cache_data(max_entries=256, show_spinner=False)
def _thumbnail(_client: ApiClient, url: str) -> bytes:
    return _client.fetch(url)


def find_cases(client: ApiClient, data: bytes, name: str, domain: str) -> dict[str, Any]:
    """Search once per analysis (Streamlit reruns the script on every interaction)."""
    try:
        return client.search(data, name, domain=domain, k=8)
    except ApiError as exc:
        return {"error": exc.detail}


def render_cases(client: ApiClient, found: dict[str, Any] | None) -> None:
    st.subheader("Similar cases")
    if found is None:
        st.info("No case library built yet: similar cases appear here once one is built.")
        return
    if "error" in found:
        st.info(f"Similar cases unavailable: {found['error']}")
        return
    hits = found.get("results", [])
    if not hits:
        st.info("No similar cases found in the library.")
        return
    cols = st.columns(4)
    for i, h in enumerate(hits):
        with cols[i % 4]:
            try:
                st.image(_thumbnail(client, h["thumbnail_url"]), width="stretch")
            except ApiError:
                st.caption("(no preview)")
            label = h.get("label_name") or h.get("label") or "unlabelled"
            st.markdown(f"**{label}** · similarity {h.get('score', 0):.2f}")
            if h.get("text"):
                st.caption(str(h["text"])[:240])
            st.caption(f"{h.get('dataset', '')} {h['id']}")


def main() -> None:
    st.set_page_config(page_title="MedLens", page_icon="🩺", layout="wide")
    settings = get_settings()
    client = _client(settings.api_url, settings.api_key)
    st.title("MedLens")
    st.warning(DISCLAIMER, icon=":material/warning:")

    try:
        info = client.info()
    except ApiError as exc:
        st.error(f"The MedLens API is not reachable at {settings.api_url}: {exc.detail}")
        st.stop()
    with st.sidebar:
        st.header("Service")
        model = info.get("model") or {}
        st.markdown(
            f"API `{settings.api_url}`  \nModel **{model.get('name', 'loading…')}** "
            f"`{model.get('fingerprint', '')}`  \nMedLens {info['medlens_version']}"
        )
        if not info["ready"]:
            st.info("The model is still loading; analyses start when it is ready.")
        domain = st.selectbox("Domain", ["auto", *info["domains"]], index=0)
        top_k = st.slider("Findings shown", 3, 10, 5)

    left, right = st.columns([2, 3], gap="large")
    with left:
        up = st.file_uploader(
            "Image or DICOM", help="PNG, JPEG, BMP, TIFF, WebP or DICOM (.dcm)", key="upload"
        )
        derm = st.file_uploader(
            "Dermoscopy image of the same lesion (optional)",
            help="Skin only, beside a clinical photo above: both are scored together, "
            "weighted as measured on validation pairs.",
            key="dermoscopy",
        )
        st.markdown("**History and symptoms**")
        symptoms = st.text_area(
            "Symptoms (optional)",
            placeholder="e.g. itchy, has grown over 3 months, bleeds",
            key="symptoms",  # read by the report downloads panel (medlens.ui.downloads)
            help="Never stored or echoed: results carry only its hash. For skin images, "
            "what it states (site, age, itch, growth, ...) is read into the fields below "
            "and shown back with the result.",
        )
        context: dict[str, Any] = {}
        vocab = _context_vocabulary(tuple(info["domains"]))
        if vocab is not None:
            with st.expander("Clinical context (optional; skin images)"):
                st.caption("Leave unknown what you do not know: unknown is never read as no.")
                context = context_inputs(vocab)
        run = st.button("Analyze", type="primary", disabled=up is None)
        if up is not None:
            data = up.getvalue()
            pixels, desc = _preview(data, up.name)
            if pixels is None:
                st.error(desc)
            else:
                st.image(pixels, caption=desc, width="stretch")

    if run and up is not None:
        data = up.getvalue()
        with right, st.spinner("Analyzing…"):
            try:
                result = client.analyze(
                    data,
                    up.name,
                    symptoms=symptoms,
                    domain=domain,
                    top_k=top_k,
                    context=context,
                    dermoscopy=None if derm is None else (derm.name, derm.getvalue()),
                )
                digest = hashlib.sha256(data).hexdigest()
                found = None
                if info["capabilities"].get("search"):
                    found = find_cases(client, data, up.name, result["domain"])
                st.session_state["analysis"] = (digest, up.name, result, found)
            except ApiError as exc:
                st.session_state.pop("analysis", None)
                right.error(f"{exc.title}: {exc.detail}")

    stored = st.session_state.get("analysis")
    if stored and up is not None and stored[0] == hashlib.sha256(up.getvalue()).hexdigest():
        _, name, result, found = stored
        with right:
            render_triage(result["triage"])
            for warning in result.get("quality", {}).get("warnings", []):
                st.warning(warning)  # low quality, atypical DICOM, unchecked model
            st.subheader("Differential")
            st.caption(
                f"Domain: {result['domain']} ({result['domain_detection']['source']}) · "
                f"model {result['model']['name']} · {result['timings_ms'].get('total', 0):.0f} ms"
            )
            with st.container(key="ml-differential"):
                findings = result["findings"]
                st.altair_chart(
                    differential_chart(findings),
                    width="stretch",
                    height=chart_height(len(findings)) + 70,  # + axis and legend
                )
            if result.get("symptoms"):
                close = ", ".join(
                    f"{c['name']} {c['probability']:.0%}"
                    for c in result["symptoms"]["closest_findings"]
                )
                st.caption(f"Symptoms point to: {close}")
            render_context(result)
            render_knowledge(result)
        render_cases(client, found)
        for capability, panel in EXTRA_PANELS.items():
            if info["capabilities"].get(capability):
                panel(client, result, up.getvalue(), name)
    st.caption(result_footer())


def result_footer() -> str:
    return "MedLens — research software for decision support only; not a diagnosis."


main()
