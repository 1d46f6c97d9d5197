"""The ``medlens calibrate`` command: fit temperatures and urgent-finding thresholds on
validation splits, print them, and (``--write``, lite only) store them in the heads file.

``register(app)`` adds it to the ``medlens`` Typer app (cli.py wires it). Errors go
through ``medlens.cli.friendly`` (one line, exit 2), imported lazily: cli imports us.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from medlens.commandline import friendly as _friendly
from medlens.commandline import progress_bar
from medlens.training.calibrate import DEFAULT_DATA


def _fmt(x: Any) -> str:
    return "—" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def calibration_tables(result: dict[str, Any]) -> list[Table]:
    """Rich tables: temperature and ECE per domain/dataset; thresholds with the
    sensitivity/specificity they reach on validation (pooled and per dataset)."""
    temps = Table(title=f"Temperature and ECE ({result['split']} split, {15}-bin ECE)")
    for col in ("domain", "T", "dataset", "n", "ECE before", "ECE after"):
        temps.add_column(col, justify="left" if col in ("domain", "dataset") else "right")
    for domain, rep in result["report"].items():
        temps.add_row(
            domain,
            _fmt(rep["temperature"]),
            "all (pooled)",
            str(rep["n"]),
            _fmt(rep["ece_before"]),
            _fmt(rep["ece_after"]),
        )
        for name, ds in rep["datasets"].items():
            temps.add_row("", "", name, str(ds["n"]), _fmt(ds["ece_before"]), _fmt(ds["ece_after"]))
    target = result["target_sensitivity"]
    th = Table(
        title=f"Urgent-finding thresholds for sensitivity ≥ {target:.2f} ({result['split']})"
    )
    for col in ("domain", "finding", "threshold", "where", "pos", "neg", "sens", "spec"):
        th.add_column(col, justify="left" if col in ("domain", "finding", "where") else "right")
    for domain, rep in result["report"].items():
        for fid, row in rep["thresholds"].items():
            if row["threshold"] is None:
                th.add_row(domain, fid, "—", row["note"], str(row["positives"]), "", "", "")
                continue
            th.add_row(
                domain,
                fid,
                f"{row['threshold']:.4f}",
                f"all (pooled; set by {row.get('set_by', 'all (pooled)')})",
                str(row["positives"]),
                str(row["negatives"]),
                _fmt(row["sensitivity"]),
                _fmt(row["specificity"]),
            )
            for name, ds in row["per_dataset"].items():
                th.add_row(
                    "",
                    "",
                    "",
                    name,
                    str(ds["positives"]),
                    str(ds["negatives"]),
                    _fmt(ds["sensitivity"]),
                    _fmt(ds["specificity"]),
                )
    return [temps, th]


def calibrate_cmd(
    model: str = typer.Option("lite", help="Encoder to calibrate."),
    data: str = typer.Option(
        ",".join(DEFAULT_DATA), help="Comma-separated datasets (their val splits are used)."
    ),
    target_sensitivity: float = typer.Option(
        0.90, min=0.01, max=1.0, help="Sensitivity each urgent-finding threshold must reach."
    ),
    limit: int | None = typer.Option(
        None, min=1, help="At most N val records per dataset (smoke runs)."
    ),
    write: bool = typer.Option(
        False,
        "--write/--no-write",
        help="Store the calibration in the lite heads file (the packaged one by default).",
    ),
    heads: Path | None = typer.Option(
        None, help="Heads file to write (default: the one the lite model was loaded from)."
    ),
    out: Path | None = typer.Option(None, help="Also write the full result as JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Fit per-domain temperatures and urgent-finding thresholds on validation splits."""
    from medlens.errors import ConfigError
    from medlens.models import load_encoder
    from medlens.training.calibrate import calibrate, write_calibration

    names = tuple(d.strip() for d in data.split(",") if d.strip())
    if write and model != "lite" and heads is None:
        raise ConfigError(
            "--write stores the calibration in a lite heads file; use --out for other models"
        )
    if model == "lite" and heads is not None:
        from medlens.models.lite import LiteEncoder

        enc = LiteEncoder.load(heads)
    else:
        enc = load_encoder(model)
    with progress_bar() as progress:

        def factory(label: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(f"embedding {label}", total=total)
            return lambda n: progress.advance(task, n)

        result = calibrate(
            model, names, target_sensitivity, encoder=enc, limit=limit, advance_factory=factory
        )
    console = Console()
    if as_json:
        console.print_json(json.dumps(result))
    else:
        for table in calibration_tables(result):
            console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    if write:
        target = heads or getattr(enc, "heads_path", None)
        if target is None:
            raise ConfigError(f"model {model!r} has no heads file to write to; give --heads")
        write_calibration(target, result)
        Console(stderr=True).print(f"wrote calibration into {target}")


def register(app: typer.Typer) -> None:
    """Add ``calibrate`` to the ``medlens`` app."""
    app.command("calibrate")(_friendly(calibrate_cmd))
