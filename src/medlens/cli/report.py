"""``medlens report``: a structured report of one image as Markdown, PDF or FHIR R4B.

The pipeline and the renderers (torch, fpdf2, fhir.resources) are imported inside the
command, never at import.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import typer

from medlens.cli.analyze import image_files
from medlens.cli.common import err, friendly, progress_bar
from medlens.config import Settings
from medlens.errors import ConfigError, MedLensError

FORMATS = ("md", "pdf", "fhir")  # = medlens.report.FORMATS, kept here so import stays light
SUFFIX = {"md": ".md", "pdf": ".pdf", "fhir": ".fhir.json"}


def report(
    path: Path = typer.Argument(
        ..., help="Image or DICOM file, or a folder (one PDF and one FHIR Bundle per image)."
    ),
    fmt: str = typer.Option("md", "--format", "-f", help="md | pdf | fhir (FHIR R4B Bundle)"),
    out: Path | None = typer.Option(
        None,
        help="Output file (default: stdout for md and fhir, IMAGE-report.pdf for pdf); "
        "for a folder, the output folder (default: medlens-reports-FOLDER).",
    ),
    domain: str = typer.Option("auto", help="dermatology | chest_xray | auto"),
    symptoms: str | None = typer.Option(None, help="Free-text symptom description."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="How many findings to report."),
    model: str | None = typer.Option(None, help="Encoder name (default: lite or MEDLENS_MODEL)."),
    *,
    settings: Settings,
) -> None:
    """Write a report of one image (findings with codes, impression, triage, disclaimer),
    or of every image in a folder (PDF + FHIR Bundle each, and summary.csv)."""
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    from medlens.pipeline import MedLens
    from medlens.report import render
    from medlens.report.compose import compose_report

    lens = MedLens(model=model, settings=settings)
    if path.is_dir():
        _report_folder(lens, path, out, domain=domain, symptoms=symptoms, top_k=top_k)
        return
    decoded = lens.decode(path)
    analysis = lens.analyze(decoded, domain=domain, symptoms=symptoms, top_k=top_k)
    report_ = compose_report(analysis, settings=settings)
    if report_.rewrite is not None:
        err.print(report_.rewrite.note)  # rewritten and checked, or why the template is shown
    data = render(report_, fmt, decoded)
    if out is None and fmt == "pdf":
        out = Path(f"{path.stem}-report.pdf")
    if out is None:
        sys.stdout.write(data.decode())
        if not data.endswith(b"\n"):
            sys.stdout.write("\n")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    err.print(f"wrote the {fmt} report of {path.name} to {out}")


def _report_folder(
    lens: Any, folder: Path, out: Path | None, *, domain: str, symptoms: str | None, top_k: int
) -> None:
    """One PDF and one FHIR Bundle per image, and summary.csv, under ``out``."""
    from medlens.report import render
    from medlens.report.compose import compose_report

    files = image_files(folder)
    out = out or Path(f"medlens-reports-{folder.name}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; for a folder, --out names a folder")
    rows: list[list[Any]] = []
    failures = 0
    with progress_bar() as progress:
        task = progress.add_task("reporting", total=len(files))
        for f in files:
            rel = f.relative_to(folder)
            try:
                decoded = lens.decode(f)
                a = lens.analyze(decoded, domain=domain, symptoms=symptoms, top_k=top_k)
                report = compose_report(a, settings=lens.settings)
                target = out / rel.parent / rel.stem
                target.parent.mkdir(parents=True, exist_ok=True)
                Path(f"{target}.pdf").write_bytes(render(report, "pdf", decoded))
                Path(f"{target}.fhir.json").write_bytes(render(report, "fhir"))
                top = report.findings[0]
                rows.append([rel, a.domain, top.id, top.probability, a.triage.level, ""])
            except MedLensError as exc:
                failures += 1
                rows.append([rel, "", "", "", "", f"{type(exc).__name__}: {exc}"])
            progress.advance(task)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "domain", "top_finding", "probability", "triage", "error"])
        w.writerows(rows)
    err.print(f"wrote {len(rows) - failures} reports ({failures} failed) and summary.csv to {out}")


def register(app: typer.Typer) -> None:
    """Add ``report`` to the ``medlens`` app."""
    app.command("report")(friendly(report))
