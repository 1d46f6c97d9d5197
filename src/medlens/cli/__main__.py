"""``python -m medlens.cli ...``: the ``medlens`` command."""

from medlens.cli import app

app()
