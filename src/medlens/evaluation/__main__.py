"""``python -m medlens.evaluation eval PROTOCOL|all ...``: the ``medlens eval`` command
without the rest of the CLI (scripts, and sites that vendor only this part)."""

import typer

from medlens.evaluation.commands import register

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


@app.callback()
def _root() -> None:
    """MedLens evaluation."""


register(app)

if __name__ == "__main__":
    app()
