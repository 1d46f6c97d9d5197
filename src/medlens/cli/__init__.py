"""The ``medlens`` command line: one Typer app, one module per command group.

    analyze.py    analyze, samples
    explain.py    explain (saliency maps and concept scores)
    train.py      train align, calibrate
    evaluate.py   eval
    retrieval.py  index, search
    cache.py      cache info|prune (the one embedding cache)
    ood.py        ood fit (the out-of-distribution gate's reference)
    service.py    serve, ui, demo, keys create|revoke|list, audit list|show|export|verify
    common.py     one-line errors with exit code 2, progress bar, logging, Settings

Every expected failure is one line on stderr and exit code 2. Importing this package
(and ``medlens --help``) loads typer and rich only: each command imports torch, the
pipeline, FastAPI, Streamlit or Qdrant inside its function, and reads the Settings from
the environment once when it starts (``common.friendly``).

A new command group is a module here with ``register(app)``, added to ``GROUPS`` below.
"""

from __future__ import annotations

import typer

from medlens.cli import analyze, cache, evaluate, explain, ood, report, retrieval, service, train

app = typer.Typer(
    name="medlens",
    help="MedLens: zero-shot triage, explanations and reports for medical images. "
    "Research software for decision support, never a diagnosis.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Help lists the commands in this order (groups with sub-commands after them).
GROUPS = (analyze, explain, report, train, evaluate, retrieval, service, cache, ood)
for _group in GROUPS:
    _group.register(app)


def main() -> None:  # pragma: no cover - console entry
    app()
