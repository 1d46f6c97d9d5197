"""The clinical-context part of the UI (issue 15): a short optional form and the result's
``context`` block.

The choices (sexes, body sites, history items) come from the knowledge pack's
``context:`` vocabulary. Unknown stays unknown: an unanswered item is never sent, so the
API never reads it as "no".
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from medlens.analysis.context import describe_field

UNKNOWN = "unknown"
ANSWERS = (UNKNOWN, "yes", "no")
FITZPATRICK = (UNKNOWN, "I", "II", "III", "IV", "V", "VI")


def context_inputs(vocab: Any, key: str = "ctx") -> dict[str, Any]:
    """Age, sex, body site, Fitzpatrick type, diameter, duration and one unknown/yes/no
    choice per history item of ``vocab`` (a ``ContextVocabulary``). Returns only what was
    answered, in the shape ``ApiClient.analyze(context=...)`` takes; ``{}`` when nothing
    was."""
    out: dict[str, Any] = {}
    age_col, sex_col, site_col = st.columns(3)
    with age_col:
        age = st.number_input(
            "Age (years)", min_value=0, max_value=120, value=None, step=1, key=f"{key}_age"
        )
    with sex_col:
        sexes = {UNKNOWN: None, **{t.name: t.id for t in vocab.sexes}}
        sex = st.selectbox("Sex", list(sexes), index=0, key=f"{key}_sex")
    with site_col:
        sites = {UNKNOWN: None, **{t.name: t.id for t in vocab.body_sites}}
        site = st.selectbox("Body site", list(sites), index=0, key=f"{key}_site")
    if age is not None:
        out["age"] = int(age)
    if sexes[sex] is not None:
        out["sex"] = sexes[sex]
    if sites[site] is not None:
        out["site"] = sites[site]
    fitz_col, diam_col, dur_col = st.columns(3)
    with fitz_col:
        fitz = st.selectbox("Fitzpatrick type", FITZPATRICK, index=0, key=f"{key}_fitzpatrick")
    with diam_col:
        diameter = st.number_input(
            "Diameter (mm)", min_value=0.1, max_value=300.0, value=None, key=f"{key}_diameter"
        )
    with dur_col:
        duration = st.number_input(
            "Present for (days)", min_value=0, value=None, step=1, key=f"{key}_duration"
        )
    if fitz != UNKNOWN:
        out["fitzpatrick"] = fitz
    if diameter is not None:
        out["diameter_mm"] = float(diameter)
    if duration is not None:
        out["duration_days"] = int(duration)
    history: dict[str, bool] = {}
    cols = st.columns(3)
    for i, item in enumerate(vocab.history):
        with cols[i % 3]:
            answer = st.radio(
                item.name.capitalize(), ANSWERS, index=0, horizontal=True, key=f"{key}_{item.id}"
            )
        if answer != UNKNOWN:
            history[item.id] = answer == "yes"
    if history:
        out["history"] = history
    return out


def render_context(result: dict[str, Any]) -> None:
    """The analysis's ``context`` block: the disagreement warning first, then what was
    given, what was read from the symptom text (so a wrong parse is visible), what was
    not understood, conflicts, and the image-alone vs with-context table."""
    ctx = result.get("context")
    if not ctx:
        return
    st.subheader("Clinical context")
    if ctx.get("disagreement"):
        st.warning(ctx["disagreement"], icon=":material/compare_arrows:")
    elif result.get("triage", {}).get("review"):
        st.warning("Image and clinical context disagree: review both before acting.")
    values = ctx.get("values", {})
    if ctx.get("given"):
        st.markdown("**Given:** " + ", ".join(describe_field(f, values) for f in ctx["given"]))
    if ctx.get("parsed"):
        st.info(
            "**Read from the symptoms (check):** "
            + ", ".join(describe_field(f, values) for f in ctx["parsed"]),
            icon=":material/edit_note:",
        )
    if ctx.get("not_understood"):
        st.warning("**Not understood:** " + ", ".join(ctx["not_understood"]))
    for conflict in ctx.get("conflicts", []):
        st.warning(f"**Conflict:** {conflict} (the stated value was used)")
    if ctx.get("effect"):
        st.dataframe(
            pd.DataFrame(
                {
                    "finding": [e["name"] for e in ctx["effect"]],
                    "image alone": [f"{e['image_only']:.1%}" for e in ctx["effect"]],
                    "with context": [f"{e['with_context']:.1%}" for e in ctx["effect"]],
                }
            ),
            hide_index=True,
            width="stretch",
        )
    if ctx.get("used"):
        st.caption(f"Used by the fusion head: {', '.join(ctx['used'])}")
    if ctx.get("note"):
        st.caption(ctx["note"])
