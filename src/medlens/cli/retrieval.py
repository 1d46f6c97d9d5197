"""``medlens index`` and ``medlens search`` (the case library). The retrieval code
(numpy, Qdrant, the encoders) is imported inside the commands."""

from __future__ import annotations

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
from medlens.errors import ConfigError


def _console() -> Any:
    from rich.console import Console

    return Console()


def index(
    source: str | None = typer.Argument(
        None, help="Dataset name (isic2018, covid_chestxray, ...), a folder, or a CSV manifest."
    ),
    domain: str | None = typer.Option(
        None, help="dermatology | chest_xray (needed for plain folders and CSVs)."
    ),
    model: str | None = typer.Option(None, help="Encoder (default: lite or MEDLENS_MODEL)."),
    name: str | None = typer.Option(
        None, "--name", help="Library name (default: MEDLENS_LIBRARY or 'default')."
    ),
    limit: int | None = typer.Option(None, min=1, help="Index a label-balanced subset."),
    batch_size: int = typer.Option(32, min=1, help="Images per forward batch."),
    workers: int = typer.Option(2, min=0, help="DataLoader decoding workers."),
    refresh: bool = typer.Option(False, help="Rewrite points already indexed."),
    named_ids: bool | None = typer.Option(
        None,
        "--named-ids/--opaque-ids",
        help="Show cases by their dataset record ids / file names (which can name a "
        "patient) instead of opaque ids (default: MEDLENS_LIBRARY_NAMED_IDS, else opaque).",
    ),
    check: bool = typer.Option(
        False, "--check", help="Report libraries that are stale against their data or model."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ray: bool = RAY_FLAG,
    ray_address: str | None = RAY_ADDRESS,
    ray_workers: int = RAY_WORKERS,
    ray_gpus: float = RAY_GPUS,
    *,
    settings: Settings,
) -> None:
    """Index images with their labels, text and metadata into a case library."""
    from medlens.retrieval.library import check_libraries, ingest, load_source, subset

    out = _console()
    lib = name or settings.library
    if check:
        rows = check_libraries([lib] if name else None)
        if as_json:
            sys.stdout.write(json.dumps({"libraries": rows}) + "\n")
        for r in rows if not as_json else []:
            state = "[red]STALE[/red]" if r["stale"] else "[green]up to date[/green]"
            out.print(f"{r['library']} / {r['collection']} ({r['points']} points): {state}")
            for why in r["reasons"]:
                out.print(f"  - {why}")
        if not rows:
            out.print("no libraries yet: run `medlens index DATASET`")
        if any(r["stale"] for r in rows):
            raise typer.Exit(1)
        return
    if source is None:
        raise ConfigError("give a dataset name, folder or CSV to index (or --check)")
    from medlens.models import load_encoder

    manifest, desc = load_source(source, domain)
    if limit is not None and limit < len(manifest.records):
        manifest = subset(manifest, limit)
        desc = {**desc, "subset": limit}
    cluster = ray_options(ray, ray_address, ray_workers, ray_gpus, batch_size)
    with progress_bar() as progress:
        task = progress.add_task(f"indexing {manifest.name}", total=len(manifest.records))
        common: dict[str, Any] = {
            "source": desc,
            "refresh": refresh,
            "advance": lambda n: progress.advance(task, n),
            "named_ids": named_ids,
        }
        if cluster is not None:
            from medlens.distributed.ingest import ray_ingest

            spec = model or settings.model
            rep = ray_ingest(manifest, spec, lib, settings=settings, options=cluster, **common)
        else:
            encoder = load_encoder(model or settings.model, device=settings.device)
            rep = ingest(manifest, encoder, lib, batch_size=batch_size, workers=workers, **common)
    if as_json:
        sys.stdout.write(json.dumps(rep.to_dict()) + "\n")
        return
    out.print(
        f"[bold]{rep.library}[/bold] / {rep.collection}: {rep.indexed} new, "
        f"{rep.already_indexed} already indexed, {rep.image_forward} images through the "
        f"model, {rep.image_cache_hits} from the cache, {len(rep.failed)} failed "
        f"({rep.seconds} s)"
    )
    for f in rep.failed[:5]:
        err.print(f"  skipped {f}")


def search(
    image: Path | None = typer.Option(None, "--image", help="Query image (or DICOM)."),
    text: str | None = typer.Option(None, "--text", help="Query text (finding, report...)."),
    target: str = typer.Option(
        "image", help="Search the cases' images or their text (reports, notes)."
    ),
    library: str | None = typer.Option(None, "--library", help="Library name."),
    domain: str | None = typer.Option(None, help="Restrict to one domain."),
    filters: list[str] | None = typer.Option(
        None, "--filter", help="FIELD=VALUE, FIELD=A,B or FIELD>=N (label, age, sex, view...)."
    ),
    k: int = typer.Option(10, "-k", "--k", min=1, max=1000, help="How many results."),
    model: str | None = typer.Option(None, help="Encoder (default: lite or MEDLENS_MODEL)."),
    as_json: bool = typer.Option(False, "--json", help='Print {"results": [...]}.'),
    *,
    settings: Settings,
) -> None:
    """Find similar cases by image or by text, with filters."""
    if (image is None) == (text is None):
        raise ConfigError("give exactly one of --image PATH or --text TEXT")
    from medlens.models import load_encoder
    from medlens.retrieval.library import collections_for
    from medlens.retrieval.library import search as lib_search
    from medlens.retrieval.store import parse_filter

    conds = [parse_filter(f) for f in filters or []]
    lib = library or settings.library
    encoder = load_encoder(model or settings.model, device=settings.device)
    if not collections_for(lib, encoder.fingerprint, domain):
        raise ConfigError(
            f"library {lib!r} has nothing indexed with model {encoder.name} "
            f"({encoder.fingerprint}){' for ' + domain if domain else ''}: run "
            f"`medlens index DATASET --name {lib}` first"
        )
    if image is not None:
        from medlens.io import load_image

        if not image.is_file():
            raise ConfigError(f"{image} is not a file")
        vec = encoder.embed_images([load_image(image).pixels])[0]
    else:
        from medlens.analysis.symptoms import clean_symptoms

        vec = encoder.embed_texts([clean_symptoms(text, settings.max_text_chars) or ""])[0]
    results = lib_search(
        vec, encoder.fingerprint, using=target, library=lib, domain=domain, k=k, filters=conds
    )
    if as_json:
        sys.stdout.write(json.dumps({"results": results}, ensure_ascii=False) + "\n")
        return
    _print_results(results)


def _print_results(results: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title=f"{len(results)} similar cases")
    for col in ("#", "similarity", "case", "labels", "text", "thumbnail"):
        table.add_column(col)
    for i, r in enumerate(results, 1):
        txt = (r.get("text") or "")[:60]
        table.add_row(
            str(i),
            f"{r['similarity']:.3f}",
            f"{r['dataset']}:{r['case_id']}",
            ", ".join(r["labels"]),
            txt,
            r.get("thumbnail") or "",
        )
    _console().print(table)


def search_quality(
    model: str | None = typer.Option(None, help="Encoder (default: lite or MEDLENS_MODEL)."),
    out: Path | None = typer.Option(None, help="Also write the result as JSON here."),
    *,
    settings: Settings,
) -> None:
    """Retrieval quality through the case library (COVID-19 notes Recall@K, ISIC 2018
    text-to-image precision); indexes what it needs first."""
    from medlens.models import load_encoder
    from medlens.retrieval.evaluate import evaluate_library

    res = evaluate_library(load_encoder(model or settings.model, device=settings.device))
    text = json.dumps(res, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    sys.stdout.write(text + "\n")


def register(app: typer.Typer) -> None:
    """Add ``index`` and ``search`` to the ``medlens`` app."""
    app.command("index")(friendly(index))
    app.command("search")(friendly(search))
    app.command("search-quality")(friendly(search_quality))
