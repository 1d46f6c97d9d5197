"""``medlens cache info|prune``: the one embedding cache (``medlens.embeddings``)."""

from __future__ import annotations

import json
import sys

import typer

from medlens.cli.common import friendly
from medlens.config import Settings


def cache_info(as_json: bool = typer.Option(False, "--json"), *, settings: Settings) -> None:
    """Where the cache is, how big, and which models and views it holds."""
    from rich.console import Console

    from medlens import embeddings

    info = embeddings.info(settings.cache_dir)
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        return
    out = Console()
    out.print(f"{info['path']}: {info['entries']} embeddings, {info['bytes'] / 2**20:.1f} MiB")
    for g in info["groups"]:
        name = g.get("name") or ""
        out.print(f"  {g['model']} {name} {g['kind']} {g.get('view', '')}: {g['entries']}")


def cache_prune(
    keep_model: list[str] | None = typer.Option(
        None, "--keep-model", help="Keep only these models' entries (default: MEDLENS_MODEL)."
    ),
    older_than: float | None = typer.Option(None, help="Only entries older than N days."),
    everything: bool = typer.Option(False, "--all", help="Empty the cache."),
    *,
    settings: Settings,
) -> None:
    """Delete cached embeddings of other models (and/or old ones)."""
    from rich.console import Console

    from medlens import embeddings

    keep = None
    if not everything:
        from medlens.models import load_encoder

        keep = [
            fp
            for m in (keep_model or [settings.model])
            for fp in embeddings.fingerprints_of(load_encoder(m, device=settings.device))
        ]
    n = embeddings.prune(
        settings.cache_dir, keep_fingerprints=keep, older_than=older_than, everything=everything
    )
    Console().print(f"deleted {n} cached embeddings")


def register(app: typer.Typer) -> None:
    """Add the ``cache`` group (``info``, ``prune``) to the ``medlens`` app."""
    cache_app = typer.Typer(help="The on-disk embedding cache.", no_args_is_help=True)
    cache_app.command("info")(friendly(cache_info))
    cache_app.command("prune")(friendly(cache_prune))
    app.add_typer(cache_app, name="cache")
