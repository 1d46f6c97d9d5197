"""What every ``medlens`` command shares: one-line errors with exit code 2, the progress
bar, the stderr console, logging, and the Settings read once when a command starts.

Cheap to import (typer and rich only): ``medlens --help`` must not load torch & co.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from medlens.config import Settings, get_settings
from medlens.errors import MedLensError

err = Console(stderr=True)


def private_log(path: Path) -> Path:
    """``path`` created (empty) with mode 0600 in a 0700 folder: logs name request ids,
    key ids and timings, which are for the operator only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(path, 0o600)
    return path


def setup_logging(settings: Settings) -> None:
    """Log to MEDLENS_HOME/logs/medlens.log. Only hashes and ids are ever logged."""
    try:
        log_file = private_log(settings.logs_dir / "medlens.log")
        handler: logging.Handler = logging.FileHandler(log_file)
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("medlens")
    if not root.handlers:
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: read the Settings from the environment once, set up logging, and
    turn MedLensError (and a few OS errors) into one line on stderr and exit code 2.

    A command that declares a ``settings`` parameter receives those Settings; the
    parameter is hidden from Typer (it is not a command-line option).
    """
    sig = inspect.signature(fn)
    wants_settings = "settings" in sig.parameters

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            settings = get_settings()
            setup_logging(settings)
            if wants_settings:
                kwargs["settings"] = settings
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

    if wants_settings:
        params = [p for name, p in sig.parameters.items() if name != "settings"]
        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
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


# -- Ray (docs/ray.md): the options ``index`` and ``analyze FOLDER`` share ------------------
RAY_FLAG = typer.Option(
    False,
    "--ray",
    help="Run on Ray (pip install 'medlens[ray]'): the cluster at RAY_ADDRESS, else a "
    "local runtime.",
)
RAY_ADDRESS = typer.Option(
    None,
    "--ray-address",
    help="Run on the Ray cluster at ADDR (host:port or ray://host:port; implies --ray).",
)
RAY_WORKERS = typer.Option(2, "--ray-workers", min=1, help="Ray workers (each loads the model).")
RAY_GPUS = typer.Option(
    0.0, "--ray-gpus", min=0.0, help="GPUs per Ray worker (> 0: the workers run on CUDA)."
)


def ray_options(
    ray: bool, address: str | None, workers: int, gpus: float, batch_size: int = 32
) -> Any:
    """``RayOptions`` for a command's --ray options, or None when the run stays local."""
    if not ray and address is None:
        return None
    from medlens.distributed.runtime import RayOptions

    return RayOptions(
        address=address or "auto", workers=workers, gpus_per_worker=gpus, batch_size=batch_size
    )
