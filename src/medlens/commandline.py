"""How every ``medlens`` command reports failure: one line on stderr, exit code 2.

Kept apart from ``medlens.cli`` so that each subsystem's command module (api, retrieval,
evaluation, training) can import it without a circular import.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer
from rich.console import Console

from medlens.config import get_settings
from medlens.errors import MedLensError

err = Console(stderr=True)


def _setup_logging() -> None:
    """Log to MEDLENS_HOME/logs/medlens.log. Only hashes and ids are ever logged."""
    settings = get_settings()
    try:
        settings.logs_dir.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(settings.logs_dir / "medlens.log")
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("medlens")
    if not root.handlers:
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn MedLensError (and a few OS errors) into one line on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except MedLensError as exc:
            err.print(
                f"[red]error:[/red] {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            err.print(f"[red]error:[/red] {exc.strerror}: {exc.filename}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def progress_bar() -> Any:
    """The progress bar every long command shows (on stderr, so --json stdout stays clean)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
    )
