"""A one-page PDF of a ``Report`` (fpdf2): the image, the differential table, the
impression, the recommendation, the limitations and the disclaimer.

The report holds no pixels, so the caller passes the decoded image (``DecodedImage``
or an RGB ``uint8`` array); the page shows a thumbnail of it. Text is set in DejaVu
Sans from matplotlib's bundled fonts (a MedLens dependency), which covers the
characters the packs use (≥, ×, —, accents); core Helvetica is the fallback.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medlens.io import DecodedImage
from medlens.report.model import Report

__all__ = ["to_pdf"]

_RISK_COLOUR = {"urgent": (200, 30, 30), "soon": (200, 130, 0), "routine": (30, 130, 60)}
THUMB_PX = 512


def _font_dir() -> Path | None:
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    d = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    return d if (d / "DejaVuSans.ttf").is_file() else None


def _thumbnail(image: DecodedImage | np.ndarray) -> Image.Image:
    pixels = image.pixels if isinstance(image, DecodedImage) else np.asarray(image)
    img = Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
    img.thumbnail((THUMB_PX, THUMB_PX))
    return img


def to_pdf(report: Report, image: DecodedImage | np.ndarray | None = None) -> bytes:
    """The report as PDF bytes (one A4 page)."""
    from fpdf import FPDF
    from fpdf.fonts import FontFace

    pdf = FPDF(format="A4", unit="mm")
    pdf.set_title(f"MedLens report - {report.indication.domain_name}")
    pdf.set_creator("MedLens")
    pdf.set_auto_page_break(auto=False)
    pdf.set_margins(12, 12, 12)
    pdf.add_page()
    fonts = _font_dir()
    if fonts is not None:
        pdf.add_font("DejaVu", "", str(fonts / "DejaVuSans.ttf"))
        pdf.add_font("DejaVu", "B", str(fonts / "DejaVuSans-Bold.ttf"))
        family = "DejaVu"
    else:  # pragma: no cover
        family = "Helvetica"

    def text(s: str) -> str:
        return s if fonts is not None else s.encode("latin-1", "replace").decode("latin-1")

    r, t = report, report.technique
    width = pdf.w - pdf.l_margin - pdf.r_margin

    pdf.set_font(family, "B", 15)
    pdf.cell(width, 8, text(f"MedLens report — {r.indication.domain_name}"), new_x="LMARGIN",
             new_y="NEXT")  # fmt: skip
    pdf.set_font(family, "", 8)
    pdf.set_text_color(110, 110, 110)
    pdf.cell(width, 4, text("AI-generated, preliminary. " + r.disclaimer), new_x="LMARGIN",
             new_y="NEXT")  # fmt: skip
    pdf.set_text_color(0, 0, 0)
    pdf.ln(2)

    top = pdf.get_y()
    overlay = r.evidence.overlay
    thumb_w = 40.0 if overlay is not None else 62.0
    if image is not None:
        thumb = _thumbnail(image)
        buf = io.BytesIO()
        thumb.save(buf, format="PNG")
        h = thumb_w * thumb.height / thumb.width
        pdf.image(buf, x=pdf.l_margin, y=top, w=thumb_w, h=h)
        img_bottom = top + h
    else:
        pdf.set_xy(pdf.l_margin, top)
        pdf.set_font(family, "", 9)
        pdf.multi_cell(thumb_w, 5, text("(image not supplied)"), border=1, align="C")
        img_bottom = pdf.get_y()
    pictures_w = thumb_w
    if overlay is not None:  # the explanation heatmap beside the image, same width
        heat = Image.open(io.BytesIO(overlay.png)).convert("RGB")
        heat.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        heat.save(buf, format="PNG")
        ox = pdf.l_margin + thumb_w + 2
        h = thumb_w * heat.height / heat.width
        pdf.image(buf, x=ox, y=top, w=thumb_w, h=h)
        pdf.set_xy(ox, top + h + 0.5)
        pdf.set_font(family, "", 6.5)
        pdf.multi_cell(thumb_w, 3, text(overlay.title[:80]), align="C")
        img_bottom = max(img_bottom, pdf.get_y())
        pictures_w = 2 * thumb_w + 2

    x = pdf.l_margin + pictures_w + 5
    col = width - pictures_w - 5
    pdf.set_xy(x, top)
    colour = _RISK_COLOUR[r.impression.triage_level]
    pdf.set_fill_color(*colour)
    pdf.set_text_color(255, 255, 255)
    pdf.set_font(family, "B", 13)
    pdf.cell(col, 9, text(f"  Triage: {r.impression.triage_level.upper()}"), fill=True,
             new_x="LEFT", new_y="NEXT")  # fmt: skip
    pdf.set_text_color(0, 0, 0)
    pdf.ln(1)
    facts = [
        ("Indication", r.indication.text),
        (
            "Technique",
            f"{t.source_format.upper()} {t.width}×{t.height}"
            + (f", {t.modality}" if t.modality else "")
            + (f", view {t.view}" if t.view else "")
            + f"; model {t.model_name} ({t.model_fingerprint}), calibration "
            f"{t.calibration or 'none'}; domain from {t.domain_source}",
        ),
        ("Input SHA-256", t.input_sha256),
    ]
    if t.study_uid:
        facts.append(("DICOM study", t.study_uid))
    for label, value in facts:
        pdf.set_x(x)
        pdf.set_font(family, "B", 8.5)
        pdf.cell(col, 4.5, text(label), new_x="LEFT", new_y="NEXT")
        pdf.set_font(family, "", 8.5)
        pdf.multi_cell(col, 4.2, text(value), align="L", new_x="LEFT", new_y="NEXT")
    pdf.set_y(max(img_bottom, pdf.get_y()) + 4)

    pdf.set_font(family, "B", 11)
    pdf.cell(width, 6, text("Findings"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(family, "", 8.5)
    heading = FontFace(emphasis="BOLD", fill_color=(225, 225, 225))
    pdf.set_fill_color(255, 255, 255)
    with pdf.table(
        col_widths=(6, 50, 20, 32, 38, 16, 16),  # an 18-digit SNOMED CT id fits
        text_align=("RIGHT", "LEFT", "RIGHT", "LEFT", "LEFT", "LEFT", "LEFT"),
        headings_style=heading,
        line_height=4.6,
        first_row_as_headings=True,
    ) as table:
        table.row(["#", "Finding", "Probability", "ICD-10-CM", "SNOMED CT", "Risk", "Triage"])
        for i, f in enumerate(r.findings, 1):
            table.row(
                [
                    str(i),
                    text(f.name),
                    f"{f.probability:.1%}",
                    ", ".join(f.icd10),
                    f.snomed or "—",
                    f.risk,
                    "sets it" if f.sets_triage else "",
                ]
            )
    pdf.ln(3)

    def section(title: str, body: str, size: float = 9.0) -> None:
        pdf.set_font(family, "B", 11)
        pdf.cell(width, 6, text(title), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(family, "", size)
        pdf.multi_cell(width, size * 0.5, text(body), align="L", new_x="LMARGIN", new_y="NEXT")
        pdf.ln(2)

    section("Impression", r.impression.text)
    section("Recommendation", r.recommendation or "None given.")
    if r.evidence.similar_reports:
        lines = []
        for sr in r.evidence.similar_reports:
            said = " ".join(x for x in (sr.impression, sr.findings) if x) or "(no text)"
            said = said if len(said) <= 170 else said[:167].rstrip() + "…"
            lines.append(f"• {sr.dataset} {sr.source_id} ({sr.similarity:.2f}): {said}")
        section("Reports of similar studies (past reports nearest by text)", "\n".join(lines), 7.5)
    section("Limitations", "\n".join(f"• {x}" for x in r.limitations), size=8.0)

    # The disclaimer sits in a box at the foot of the page, always.
    pdf.set_y(max(pdf.get_y() + 2, pdf.h - 30))
    pdf.set_font(family, "B", 9.5)
    pdf.set_fill_color(255, 243, 205)
    pdf.multi_cell(width, 5.5, text(r.disclaimer), border=1, fill=True, align="C",
                   new_x="LMARGIN", new_y="NEXT")  # fmt: skip
    pdf.set_font(family, "", 7)
    pdf.set_text_color(110, 110, 110)
    pdf.cell(width, 4, text(f"MedLens report v{r.report_version} · analysis schema "
                            f"v{r.analysis_schema_version}"), align="C")  # fmt: skip
    out: Any = pdf.output()
    return bytes(out)
