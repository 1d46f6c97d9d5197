"""The UI's explanation panel: where the model looked, over the uploaded image.

Registered in ``medlens.ui.app.EXTRA_PANELS`` under the ``explain`` capability that
``POST /v1/explain`` announces in ``/v1/info``. The map comes from the API as JSON (its
low-resolution grid), once per (image, target, method); the opacity slider re-blends it
locally over the preview pixels, so moving the slider costs no model work. No torch in
the UI process: the grid is upsampled with PIL and coloured with matplotlib's jet.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import streamlit as st

from medlens.ui.client import ApiClient, ApiError

QUERY_LABEL = "Show me signs of… (free-text query)"
METHODS = {"text": "text saliency", "gradcam": "Grad-CAM"}


def upsample_grid(grid: Any, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 in [0, 1]: the map's low-resolution grid resized (bilinear) to the
    image's geometry and min-max scaled."""
    from PIL import Image

    g = np.asarray(grid, dtype=np.float32)
    if g.ndim != 2 or g.size == 0:
        raise ValueError("the explanation grid must be a non-empty 2-D array")
    h, w = (int(s) for s in shape)
    up = np.asarray(Image.fromarray(g, mode="F").resize((w, h), Image.Resampling.BILINEAR))
    lo, hi = float(up.min()), float(up.max())
    return np.zeros((h, w), np.float32) if hi - lo <= 1e-12 else (up - lo) / (hi - lo)


def blend(pixels: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    """(H, W, 3) uint8: ``pixels`` with the jet-coloured ``heat`` blended over it at
    opacity ``alpha`` (0 = the image alone, 1 = the map alone)."""
    from matplotlib import colormaps

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1 (got {alpha})")
    colour = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    out = (1.0 - alpha) * np.asarray(pixels, np.float32) + alpha * colour
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def request_explanation(
    client: ApiClient,
    data: bytes,
    name: str,
    *,
    domain: str,
    method: str,
    finding: str | None = None,
    query: str | None = None,
) -> dict[str, Any]:
    """``POST /v1/explain`` (JSON) for one target; ApiError carries the API's problem."""
    form: dict[str, Any] = {"domain": domain, "method": method}
    if query is not None:
        form["query"] = query
    elif finding is not None:
        form["finding"] = finding
    return client.explain(data, name, **form)


def _pixels(data: bytes, name: str) -> np.ndarray | None:
    from medlens.errors import MedLensError
    from medlens.io import load_image

    try:
        return load_image(data, filename=name).pixels
    except MedLensError:
        return None


def explain_panel(client: ApiClient, result: dict[str, Any], data: bytes, name: str) -> None:
    """Target (a finding of the differential or a free-text query), method, opacity."""
    st.subheader("Where the model looked")
    findings = {f["id"]: f for f in result.get("findings", [])}
    labels = {fid: f"{f['name']} ({f['probability']:.0%})" for fid, f in findings.items()}
    c1, c2, c3 = st.columns([3, 2, 2])
    with c1:
        query = st.text_input(
            QUERY_LABEL,
            key="ml-explain-query",
            placeholder='e.g. "blue-white veil" — leave empty to explain a finding',
            max_chars=300,
        ).strip()
        finding = st.selectbox(
            "Finding",
            list(labels),
            format_func=labels.get,
            key="ml-explain-finding",
            disabled=bool(query),
        )
    with c2:
        method = st.radio(
            "Method",
            list(METHODS),
            format_func=METHODS.get,
            key="ml-explain-method",
            disabled=bool(query),
            help="A free-text query is always explained by text saliency.",
        )
    with c3:
        alpha = st.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key="ml-explain-alpha")
    if query:
        method = "text"
    digest = hashlib.sha256(data).hexdigest()
    key = (digest, result.get("domain", "auto"), method, finding if not query else None, query)
    store = st.session_state.setdefault("ml-explanations", {})
    if key not in store:
        with st.spinner("Computing the map…"):
            try:
                store[key] = request_explanation(
                    client,
                    data,
                    name,
                    domain=result.get("domain", "auto"),
                    method=method,
                    finding=None if query else finding,
                    query=query or None,
                )
            except ApiError as exc:
                store[key] = {"error": f"{exc.title}: {exc.detail}"}
    got = store[key]
    if "error" in got:
        st.error(got["error"])
        return
    pixels = _pixels(data, name)
    if pixels is None:
        st.info("The image cannot be previewed here; the map is available from the API.")
        return
    e = got["explanation"]
    what = f'query "{e["label"]}"' if e["target"] == "query" else e["label"]
    p = got.get("finding_probability")
    caption = f"{what} — {METHODS.get(e['method'], e['method'])}"
    if p is not None:
        caption += f" (p = {p:.1%})"
    caption += f" · top 10 % of pixels hold {e['top10_energy']:.0%} of the map"
    heat = upsample_grid(e["grid"], pixels.shape[:2])
    with st.container(key="ml-explain-overlay"):
        st.image(blend(pixels, heat, alpha), caption=caption, width=520)
    st.caption(
        "Blue = low, red = high relative saliency (min-max scaled per map): where the "
        "model's evidence for this target sits, not a segmentation."
    )
    shown = ", ".join(f"{c['name']} {c['score']:.2f}" for c in got.get("concepts", [])[:4])
    if shown:
        st.caption(f"The image shows: {shown} ({got.get('concepts_note', 'uncalibrated')})")
