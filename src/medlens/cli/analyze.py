"""``medlens analyze`` (one image or a folder) and ``medlens samples``.

The pipeline (torch, the encoders) is imported inside the commands, never at import.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import typer

from medlens.cli.common import (
    RAY_ADDRESS,
    RAY_FLAG,
    RAY_GPUS,
    RAY_WORKERS,
    err,
    friendly,
    progress_bar,
    ray_options,
)
from medlens.config import Settings
from medlens.errors import ConfigError, MedLensError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}

DEMO_FILES = [
    ("isic2018-task3-test/images/ISIC_0034524.jpg", "isic2018"),
    ("isic2018-task3-test/images/ISIC_0034529.jpg", "isic2018"),
    ("isic2018-task3-test/images/ISIC_0034545.jpg", "isic2018"),
    ("cxr-samples/00000001_000.png", "NIH: Cardiomegaly"),
    ("cxr-samples/00027426_000.png", "NIH: No Finding"),
    ("cxr-samples/tb0005.png", "TBX11K: tuberculosis"),
    ("cxr-samples/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm", "DICOM"),
]


def _console() -> Any:
    from rich.console import Console

    return Console()


def check_context(context: dict[str, Any] | None, domain: str) -> None:
    """Fail fast on impossible context values (before the model loads, and once for a
    whole folder rather than once per image): they must be valid for ``domain``, or for
    at least one pack that takes context when the domain is ``auto``. Domains without a
    context vocabulary accept anything (the analysis notes that it was not used)."""
    if not context:
        return
    from medlens.analysis.context import build_context
    from medlens.errors import InvalidContext
    from medlens.knowledge import domains, load_domain

    ids = domains() if domain == "auto" else [domain] if domain in domains() else []
    vocabs = [v for d in ids if (v := load_domain(d).domain.context) is not None]
    first: InvalidContext | None = None
    for vocab in vocabs:
        try:
            build_context(vocab, **context)
            return
        except InvalidContext as exc:
            first = first or exc
    if first is not None:
        raise first


def print_context(console: Any, ctx: dict[str, Any] | None) -> None:
    """The ``context`` block: given, parsed from the text, not understood, conflicts,
    the effect on the differential (image alone vs with context) and any disagreement."""
    if not ctx:
        return
    from rich.markup import escape
    from rich.table import Table

    from medlens.analysis.context import describe_field

    values = ctx.get("values", {})
    console.print("\n[bold]Clinical context[/bold]")
    if ctx.get("given"):
        console.print("  Given: " + ", ".join(describe_field(f, values) for f in ctx["given"]))
    if ctx.get("parsed"):
        console.print(
            "  Read from the symptoms (check): "
            + ", ".join(describe_field(f, values) for f in ctx["parsed"])
        )
    if ctx.get("not_understood"):
        words = ", ".join(escape(w) for w in ctx["not_understood"])  # the user's words
        console.print(f"  [yellow]Not understood:[/yellow] {words}")
    for c in ctx.get("conflicts", []):
        console.print(f"  [yellow]Conflict:[/yellow] {escape(c)} (the stated value is used)")
    if ctx.get("used"):
        console.print(f"  Used by the fusion head: {', '.join(ctx['used'])}")
    if ctx.get("note"):
        console.print(f"  [dim]{escape(ctx['note'])}[/dim]")
    if ctx.get("effect"):
        table = Table(title="Effect of the context", show_lines=False)
        table.add_column("Finding")
        table.add_column("Image alone", justify="right")
        table.add_column("With context", justify="right")
        for e in ctx["effect"]:
            table.add_row(e["name"], f"{e['image_only']:.1%}", f"{e['with_context']:.1%}")
        console.print(table)
    if ctx.get("disagreement"):
        console.print(
            f"[bold yellow]Image and context disagree:[/bold yellow] {escape(ctx['disagreement'])}"
        )


def print_analysis(result: dict[str, Any], top_k: int) -> None:
    from rich.table import Table

    console = _console()
    tri = result["triage"]
    colour = {"urgent": "red", "soon": "yellow", "routine": "green"}[tri["level"]]
    console.print(
        f"[bold]Domain:[/bold] {result['domain']} ({result['domain_detection']['source']})   "
        f"[bold]Model:[/bold] {result['model']['name']} ({result['model']['fingerprint']})"
    )
    for warning in result.get("quality", {}).get("warnings", []):
        console.print(f"[yellow]Warning:[/yellow] {warning}")
    table = Table(title="Differential", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("Finding")
    table.add_column("Probability", justify="right")
    table.add_column("ICD-10-CM")
    table.add_column("Risk")
    for i, f in enumerate(result["findings"][:top_k], 1):
        name = f["name"] + (" [dim](classifier)[/dim]" if f.get("source") == "classifier" else "")
        table.add_row(str(i), name, f"{f['probability']:.1%}", ", ".join(f["icd10"]), f["risk"])
    console.print(table)
    console.print(
        f"[bold {colour}]Triage: {tri['level'].upper()}[/bold {colour}] — {tri['reason']}"
    )
    if tri["next_step"]:
        console.print(f"Next step: {tri['next_step']}")
    if tri.get("review"):
        console.print(
            "[bold yellow]Review:[/bold yellow] image and clinical context disagree "
            "(see Clinical context below)"
        )
    print_context(console, result.get("context"))
    for d in result["descriptions"][:2]:
        s = d["sections"]
        console.print(f"\n[bold]{d['name']}[/bold] [dim]({d['source']})[/dim]")
        console.print(f"  Presentation: {s['presentation']}")
        console.print(f"  Image features: {s['image_features']}")
        console.print(f"  Differentials: {s['differentials']}")
    console.print(f"\n[dim]{result['disclaimer']}[/dim]")


def analyze(
    path: Path = typer.Argument(..., help="Image/DICOM file, or a folder of them."),
    domain: str = typer.Option("auto", help="dermatology | chest_xray | auto"),
    symptoms: str | None = typer.Option(None, help="Free-text symptom description."),
    age: float | None = typer.Option(None, help="Clinical context: age in years."),
    sex: str | None = typer.Option(None, help="Clinical context: female | male."),
    site: str | None = typer.Option(
        None, help="Clinical context: body site (a knowledge-pack id, e.g. back, face, arm)."
    ),
    fitzpatrick: str | None = typer.Option(
        None, help="Clinical context: Fitzpatrick skin type, 1-6 (or I-VI)."
    ),
    diameter: float | None = typer.Option(
        None, "--diameter", help="Clinical context: lesion diameter in mm."
    ),
    duration_days: float | None = typer.Option(
        None, "--duration-days", help="Clinical context: days since the lesion appeared."
    ),
    history: str | None = typer.Option(
        None,
        help="Clinical context: history items, comma-separated, no- for 'no' "
        "(itch, grew, hurt, changed, bleed, elevation), e.g. grew,bleed,no-itch.",
    ),
    dermoscopy: Path | None = typer.Option(
        None,
        "--dermoscopy",
        help="The dermoscopy image of the lesion PATH (a clinical photo) shows; both are "
        "scored together, weighted as measured on validation pairs. One file, not a folder.",
    ),
    top_k: int = typer.Option(5, "--top-k", min=1, help="How many findings to show."),
    model: str | None = typer.Option(None, help="Encoder name (default: lite or MEDLENS_MODEL)."),
    as_json: bool = typer.Option(False, "--json", help="Print the analysis as one JSON object."),
    out: Path | None = typer.Option(
        None,
        help="Folder mode: output file (.jsonl or .csv; with --ray .jsonl or .parquet, resumable).",
    ),
    explain: bool = typer.Option(
        False,
        "--explain",
        help="Attach text-saliency maps for the top 3 findings (JSON: explanations[]; "
        "overlay PNGs: medlens explain).",
    ),
    ray: bool = RAY_FLAG,
    ray_address: str | None = RAY_ADDRESS,
    ray_workers: int = RAY_WORKERS,
    ray_gpus: float = RAY_GPUS,
    *,
    settings: Settings,
) -> None:
    """Analyze one image (ranked differential, triage, descriptions) or a whole folder.

    The clinical-context options (age, sex, site, ...) are all optional; a field left out
    stays unknown. In a folder they apply to every image.
    """
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    cluster = ray_options(ray, ray_address, ray_workers, ray_gpus)
    if cluster is not None and not path.is_dir():
        raise ConfigError("--ray analyzes a folder: give a folder, or drop --ray for one image")
    from medlens.analysis.context import given_fields

    context = given_fields(
        age=age,
        sex=sex,
        site=site,
        fitzpatrick=fitzpatrick,
        diameter_mm=diameter,
        duration_days=duration_days,
        history=history,
    )
    check_context(context, domain)
    if cluster is not None:
        _analyze_folder_on_ray(
            path,
            cluster,
            model=model,
            domain=domain,
            symptoms=symptoms,
            context=context,
            top_k=top_k,
            out=out,
            settings=settings,
        )
        return
    from medlens.pipeline import MedLens

    lens = MedLens(model=model, settings=settings)
    if dermoscopy is not None and (path.is_dir() or not dermoscopy.is_file()):
        raise ConfigError("--dermoscopy takes one image file and goes with one image, not a folder")
    if path.is_dir():
        _analyze_folder(
            lens, path, domain=domain, symptoms=symptoms, context=context, top_k=top_k, out=out
        )
        return
    decoded = lens.decode(path)  # once, for the analysis and its maps
    analysis = lens.analyze(
        decoded,
        domain=domain,
        symptoms=symptoms,
        context=context,
        top_k=top_k,
        dermoscopy=dermoscopy,
    )
    result = analysis.to_dict()
    if explain:
        from medlens.explain.explanation import attach_maps

        result["explanations"] = attach_maps(lens, analysis, decoded, top=3)
    if as_json:
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
        return
    print_analysis(result, top_k)
    console = _console()
    for m in result.get("explanations", []):
        row, col = m["peak"]["relative"]
        console.print(
            f"[dim]map for {m['label']}: peak at {row:.0%} down, {col:.0%} across; "
            f"{m['top10_energy']:.0%} of the energy in the top 10 % of pixels[/dim]"
        )


def image_files(folder: Path) -> list[Path]:
    """The image and DICOM files under ``folder`` (recursively, sorted); none is an error."""
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ConfigError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return files


def _analyze_folder(
    lens: Any,
    folder: Path,
    *,
    domain: str,
    symptoms: str | None,
    context: dict[str, Any] | None,
    top_k: int,
    out: Path | None,
) -> None:
    from medlens.distributed.outputs import SUMMARY, folder_row, summary
    from medlens.io.ahead import ahead

    files = image_files(folder)
    out = out or Path(f"medlens-{folder.name}.jsonl")
    rows: list[dict[str, Any]] = []
    failures = 0

    def decode(f: Path) -> Any:  # in the background thread: the next file's pixels
        try:
            return lens.decode(f)
        except MedLensError as exc:
            return exc

    with progress_bar() as progress:
        task = progress.add_task("analyzing", total=len(files))
        for f, decoded in ahead(files, decode):
            try:
                if isinstance(decoded, MedLensError):
                    raise decoded
                r = lens.analyze(
                    decoded, domain=domain, symptoms=symptoms, context=context, top_k=top_k
                ).to_dict()
                rows.append(folder_row(str(f.relative_to(folder)), r))
            except MedLensError as exc:
                failures += 1
                error = f"{type(exc).__name__}: {exc}"
                rows.append(folder_row(str(f.relative_to(folder)), error=error))
            progress.advance(task)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        with open(out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=SUMMARY)
            w.writeheader()
            w.writerows(summary(r) for r in rows)
    else:
        with open(out, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    err.print(f"wrote {len(rows)} results ({failures} failed) to {out}")


def _analyze_folder_on_ray(
    folder: Path,
    cluster: Any,
    *,
    model: str | None,
    domain: str,
    symptoms: str | None,
    context: dict[str, Any] | None,
    top_k: int,
    out: Path | None,
    settings: Settings,
) -> None:
    """``analyze FOLDER --ray``: rows streamed to a resumable .jsonl / .parquet output."""
    from medlens.distributed.analyze import analyze_folder

    files = image_files(folder)
    out = out or Path(f"medlens-{folder.name}.jsonl")
    with progress_bar() as progress:
        task = progress.add_task("analyzing on Ray", total=len(files))
        run = analyze_folder(
            folder,
            files,
            out,
            settings=settings,
            options=cluster,
            model=model,
            domain=domain,
            symptoms=symptoms,
            context=context,
            top_k=top_k,
            advance=lambda n: progress.advance(task, n),
        )
    err.print(
        f"wrote {run.analyzed + run.failed} results ({run.failed} failed, "
        f"{run.already_written} already in the output) to {out} in {run.seconds} s"
    )


def samples(
    model: str | None = typer.Option(None, help="Encoder name (default: lite)."),
    *,
    settings: Settings,
) -> None:
    """Analyze a handful of sample images from MEDLENS_DATA and print a table."""
    from rich.table import Table

    from medlens.pipeline import MedLens

    data = settings.require_data()
    truth = _isic_truth(data)
    lens = MedLens(model=model, settings=settings)
    table = Table(title=f"MedLens demo — model {lens.model_name}")
    for col in ("image", "truth", "domain", "top findings", "triage"):
        table.add_column(col)
    with progress_bar() as progress:
        task = progress.add_task("analyzing samples", total=len(DEMO_FILES))
        for rel, label in DEMO_FILES:
            path = data / rel
            if not path.is_file():
                progress.advance(task)
                continue
            r = lens.analyze(path).to_dict()
            top = ", ".join(f"{f['name']} {f['probability']:.0%}" for f in r["findings"][:3])
            t = truth.get(path.stem, label)
            table.add_row(path.name[-28:], t, r["domain"], top, r["triage"]["level"])
            progress.advance(task)
    console = _console()
    console.print(table)
    console.print("[dim]Research software for decision support only; not a diagnosis.[/dim]")


def _isic_truth(data: Path) -> dict[str, str]:
    labels = data / "isic2018-task3-test" / "labels.csv"
    if not labels.is_file():
        return {}
    with open(labels) as fh:
        return {r["image_id"]: f"ISIC: {r['dx']}" for r in csv.DictReader(fh)}


def register(app: typer.Typer) -> None:
    """Add ``analyze`` and ``samples`` to the ``medlens`` app."""
    app.command("analyze")(friendly(analyze))
    app.command("samples")(friendly(samples))
