"""``medlens ood fit``: the out-of-distribution gate's reference for a model."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import typer

from medlens.cli.common import friendly, progress_bar
from medlens.config import Settings


def ood_fit(
    model: str = typer.Option(None, "--model", help="Model spec (default: MEDLENS_MODEL)."),
    acceptance: float = typer.Option(
        0.99, min=0.5, max=1.0, help="Share of each validation set admitted, per distance."
    ),
    max_fit: int = typer.Option(800, min=50, help="Training images per dataset."),
    max_val: int = typer.Option(800, min=50, help="Validation images per dataset."),
    install: bool = typer.Option(
        False,
        "--install",
        help="Write into the package's models/cards (ships with MedLens) instead of "
        "MEDLENS_HOME/cards.",
    ),
    as_json: bool = typer.Option(False, "--json"),
    *,
    settings: Settings,
) -> None:
    """Fit, per domain, where the model's embeddings of its training data lie, and the
    distance beyond which an image abstains (chosen on validation splits only)."""
    from rich.console import Console

    from medlens.models import load_encoder
    from medlens.models.card import PACKAGED_CARDS, write_ood
    from medlens.training.ood import fit_reference

    enc = load_encoder(model or settings.model, device=settings.device)
    with progress_bar() as progress:

        def factory(label: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(f"embedding {label}", total=total)
            return lambda n: progress.advance(task, n)

        ref, report = fit_reference(
            enc,
            settings=settings,
            acceptance=acceptance,
            max_fit=max_fit,
            max_val=max_val,
            progress=factory,
        )
    path = write_ood(ref, PACKAGED_CARDS if install else settings.cards_dir)
    if as_json:
        sys.stdout.write(json.dumps({"path": str(path), "id": ref.id, **report}) + "\n")
        return
    out = Console()
    for domain, r in report.items():
        for name, row in r["datasets"].items():
            feat = row["feat_threshold"]
            out.print(
                f"{domain}/{name}: {row['fit']} training (+{row['jittered']} jittered), "
                f"{row['val']} validation images; thresholds: embedding "
                f"{row['emb_threshold']:.1f}" + (f", features {feat:.3f}" if feat else "")
            )
    out.print(f"wrote {path} (reference {ref.id})")


def register(app: typer.Typer) -> None:
    """Add the ``ood`` group (``fit``) to the ``medlens`` app."""
    ood_app = typer.Typer(help="The out-of-distribution gate.", no_args_is_help=True)
    ood_app.command("fit")(friendly(ood_fit))
    app.add_typer(ood_app, name="ood")
