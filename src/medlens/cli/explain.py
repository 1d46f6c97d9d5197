"""``medlens explain``: where the model looked for a finding or a free-text query.

torch, the encoder and matplotlib are imported inside the command, never at import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from medlens.cli.common import err, friendly
from medlens.config import Settings
from medlens.errors import ConfigError


def write_overlay(pixels: Any, sal: Any, title: str, out: Path, alpha: float = 0.45) -> Path:
    """The image with the map over it (jet, ``alpha``) and a colour bar, as PNG."""
    from medlens.explain.explanation import overlay_png

    data = overlay_png(pixels, sal.map, title, alpha)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def explain(
    image: Path = typer.Argument(..., help="Image or DICOM file."),
    finding: str | None = typer.Option(None, help="Finding id to explain (default: the top one)."),
    query: str | None = typer.Option(None, help='Free-text query, e.g. "blue-white veil".'),
    method: str = typer.Option("text", help="text (text-conditioned saliency) | gradcam"),
    domain: str = typer.Option("auto", help="dermatology | chest_xray | auto"),
    out: Path | None = typer.Option(None, help="Write an overlay PNG here."),
    model: str | None = typer.Option(None, help="Encoder name (only lite is explained so far)."),
    as_json: bool = typer.Option(False, "--json", help="Print the explanation as JSON."),
    *,
    settings: Settings,
) -> None:
    """Show where the model looked: a map for a finding or a free-text query, and the
    pack's concept scores (uncalibrated). The image is analysed as ``analyze`` does, so
    the map explains the probability ``analyze`` reports."""
    from medlens.explain.explanation import check_request

    query = check_request(finding, query, method, domain)  # before any model is loaded
    if not image.exists():
        raise ConfigError(f"{image} does not exist")

    from medlens.explain.explanation import explain_image
    from medlens.pipeline import MedLens

    lens = MedLens(model=model, settings=settings, retrieval=False)
    ex = explain_image(lens, image, finding=finding, query=query, method=method, domain=domain)
    if out is not None:
        write_overlay(ex.pixels, ex.saliency, ex.title, out)
    result = {**ex.to_dict(), "overlay": None if out is None else str(out)}
    if as_json:
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
        return
    _print(result)


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    e = result["explanation"]
    p = result["finding_probability"]
    what = f'query "{e["label"]}"' if e["target"] == "query" else e["label"]
    prob = "" if p is None else f" (probability {p:.1%})"
    console.print(f"[bold]{what}[/bold]{prob} — {e['method']} map {e['grid_shape']}")
    console.print(
        f"peak at {e['peak']['relative']} of the image (row, column); "
        f"top 10 % of pixels hold {e['top10_energy']:.0%} of the map"
    )
    shown = ", ".join(f"{c['name']} {c['score']:.2f}" for c in result["concepts"][:4])
    if shown:
        console.print(f"The image shows: {shown}  [dim]({result['concepts_note']})[/dim]")
    if result["overlay"]:
        err.print(f"wrote {result['overlay']}")


def register(app: typer.Typer) -> None:
    app.command("explain")(friendly(explain))
