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


def _pack_for(lens: Any, emb: Any, domain: str, finding: str | None) -> Any:
    """The pack to explain in: given, the one holding ``finding``, else detected."""
    from medlens.analysis import domain as domain_mod
    from medlens.knowledge import domains, load_domain

    if domain != "auto":
        if domain not in domains():
            raise ConfigError(
                f"unknown domain {domain!r}; choose one of {', '.join(('auto', *domains()))}"
            )
        return load_domain(domain)
    if finding is not None:
        holders = [d for d in domains() if finding in load_domain(d).finding_ids]
        if not holders:
            raise ConfigError(
                f"unknown finding {finding!r}: no knowledge pack has it "
                "(`medlens analyze --json` lists the finding ids)"
            )
        return load_domain(holders[0])
    scores = domain_mod.domain_scores(emb, lens.encoder, lens.cache_dir)[0]
    return load_domain(domains()[int(scores.argmax())])


def write_overlay(pixels: Any, sal: Any, title: str, out: Path, alpha: float = 0.45) -> Path:
    """The image with the map over it (jet, ``alpha``) and a colour bar, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = sal.map.shape
    fig, ax = plt.subplots(figsize=(6, 6 * h / w + 0.6), dpi=100)
    try:
        ax.imshow(pixels)
        im = ax.imshow(sal.map, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cbar.set_label("relative saliency (min-max scaled)")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
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
    pack's concept scores (uncalibrated)."""
    from medlens.explain.saliency import METHODS, clean_query

    if finding is not None and query is not None:
        raise ConfigError("give --finding or --query, not both")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if query is not None:
        query = clean_query(query)
    if not image.exists():
        raise ConfigError(f"{image} does not exist")

    import numpy as np

    from medlens.analysis import scoring
    from medlens.explain import concepts, saliency
    from medlens.models.base import ensemble, flipped
    from medlens.pipeline import MedLens

    lens = MedLens(model=model, settings=settings, retrieval=False)
    decoded = lens.decode(image)
    enc = lens.encoder
    emb = enc.embed_images([decoded.pixels])
    pack = _pack_for(lens, emb, domain, finding)
    if finding is not None:
        pack.finding(finding)  # ConfigError for an id this pack does not have
    score_emb = emb[0]
    if pack.domain.test_time_flips:  # score as analyze does: the image and its flips
        views = enc.embed_images([flipped(decoded.pixels, f) for f in pack.domain.test_time_flips])
        score_emb = ensemble(np.vstack([emb, views]))
    scores = scoring.score(enc, pack, score_emb, lens.card.calibration, prompt_cache=lens.cache_dir)
    probs = scores.as_dict(pack)
    if finding is None and query is None:
        finding = max(probs, key=probs.get)
    sal = saliency.explain(
        enc,
        decoded.pixels,
        pack,
        finding=finding,
        query=query,
        method=method,
        cache_dir=lens.cache_dir,
    )
    label = f'query "{sal.label}"' if query is not None else sal.label
    if out is not None:
        title = f"{label} — {'Grad-CAM' if method == 'gradcam' else 'text saliency'}"
        if finding is not None:
            title += f" (p = {probs[finding]:.1%})"
        write_overlay(decoded.pixels, sal, title, out)
    result = {
        "domain": pack.id,
        "model": {"name": lens.model_name, "fingerprint": enc.fingerprint},
        "input": {"content_hash": decoded.content_hash, "shape": list(sal.map.shape)},
        "finding_probability": None if finding is None else round(probs[finding], 4),
        "explanation": sal.summary(),
        "concepts": concepts.concept_scores(enc, pack, emb[0], lens.cache_dir),
        "concepts_note": concepts.CALIBRATION_NOTE,
        "overlay": None if out is None else str(out),
    }
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
