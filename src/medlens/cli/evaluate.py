"""``medlens eval``: run named protocols, write metrics JSON, a Markdown report and plots
per protocol. The protocols (numpy, scipy, torch) are imported inside the command."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from medlens.cli.common import err, friendly, progress_bar
from medlens.config import Settings
from medlens.errors import ConfigError


def _command_line(protocol: str, model: str | None, limit: int | None, out: Path) -> str:
    parts = ["medlens", "eval", protocol]
    if model:
        parts += ["--model", model]
    if limit:
        parts += ["--limit", str(limit)]
    parts += ["--out", str(out)]
    return " ".join(parts)


def write_outputs(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``<out>/<protocol>.json`` and ``<out>/<protocol>.md`` (plots are in ``<out>/plots``)."""
    from medlens.evaluation.report import render_markdown

    out.mkdir(parents=True, exist_ok=True)
    name = result["protocol"]
    js = out / f"{name}.json"
    md = out / f"{name}.md"
    js.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    md.write_text(render_markdown(result, "plots"))
    return js, md


def evaluate(
    protocol: str = typer.Argument(..., help="Protocol name (see protocols.yaml), or 'all'."),
    model: str | None = typer.Option(None, help="Encoder name (default: lite or MEDLENS_MODEL)."),
    limit: int | None = typer.Option(
        None, min=1, help="Evaluate only N records per split, evenly spaced (smoke mode)."
    ),
    out: Path = typer.Option(
        Path("results"), help="Folder for <protocol>.json, <protocol>.md and plots/."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics object(s) as JSON."),
    *,
    settings: Settings,
) -> None:
    """Evaluate an encoder on fixed, named protocols of the sample datasets (MEDLENS_DATA):
    metrics with bootstrap 95% CIs, calibration, plots and the published anchors."""
    from rich.console import Console

    from medlens.evaluation.protocols import protocols, run_protocol
    from medlens.evaluation.report import fmt, fmt_ci, headline_rows
    from medlens.models import load_encoder

    available = list(protocols())
    if protocol != "all" and protocol not in available:
        raise ConfigError(
            f"unknown protocol {protocol!r}; choose one of {', '.join(available)}, all"
        )
    settings.require_data()
    names = available if protocol == "all" else [protocol]
    enc = load_encoder(model or settings.model, device=settings.device)
    console = Console()
    results: dict[str, dict[str, Any]] = {}
    with progress_bar() as bar:

        def factory(label: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(f"embedding {label}", total=total)
            return lambda n: bar.advance(task, n)

        for name in names:
            res = run_protocol(
                name,
                enc,
                limit=limit,
                advance_factory=factory,
                plot_dir=out / "plots",
                settings=settings,
            )
            res["command"] = _command_line(name, model, limit, out)
            write_outputs(res, out)
            results[name] = res
    if as_json:
        payload = results if len(results) > 1 else results[names[0]]
        sys.stdout.write(json.dumps(payload, ensure_ascii=False) + "\n")
        return
    for name, res in results.items():
        console.print(f"[bold]{name}[/bold] — {res['title']} (n={res['dataset']['n']})")
        for label, v, ci in headline_rows(res)[:8]:
            console.print(f"  {label}: {fmt(v)} {fmt_ci(ci)}", highlight=False)
        if res.get("caveat"):
            console.print(f"  [yellow]caveat:[/yellow] {res['caveat']}", highlight=False)
    err.print(f"wrote {len(results)} report(s) to {out}/ (<protocol>.json, .md, plots/)")


def register(app: typer.Typer) -> None:
    """Add ``eval`` to the ``medlens`` app."""
    app.command("eval")(friendly(evaluate))
